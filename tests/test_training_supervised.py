"""DeiT-style supervised training: Mixup / CutMix (images mixed, superpixels kept), label smoothing, EMA, LARS and
parameter groups, and `CastForImageClassification` under the transformers `Trainer`."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_hierseg import CastForImageClassification
from hf_hierseg.training.optim import LARS, create_optimizer, parameter_groups
from hf_hierseg.training.supervised import (
    ModelEma,
    SupervisedObjective,
    cutmix_box,
    mixup_cutmix,
    smooth_one_hot,
    soft_target_cross_entropy,
)

from cast_testing import CastModelTester


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; fixtures made with one thread


TESTER = CastModelTester(image_size=32)


def test_smoothed_one_hot_targets():
    targets = smooth_one_hot(torch.tensor([0, 2]), 4, smoothing=0.1)
    torch.testing.assert_close(targets, torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]]))
    logits = torch.randn(2, 4)
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, targets), F.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.1)
    )


def test_cutmix_pastes_the_partners_box_and_weights_targets_by_its_area():
    pixel_values = torch.arange(4.0)[:, None, None, None].expand(4, 3, 16, 16).clone()  # image i is filled with i
    labels = torch.tensor([0, 1, 2, 0])
    for seed in range(10):
        mixed, targets, lam, mode = mixup_cutmix(
            pixel_values, labels, 3, np.random.default_rng(seed), mixup_alpha=0, cutmix_alpha=1.0, label_smoothing=0.0
        )
        assert mode == "cutmix"
        for i in range(4):
            partner = 3 - i  # the batch is mixed with its reverse
            from_partner = (mixed[i] == partner).all(0)
            # The pasted region is a box whose area fraction is 1 - lam (for i != partner).
            if i != partner:
                assert from_partner.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
                assert ((mixed[i] == i).all(0) | from_partner).all()
            expected = lam * F.one_hot(labels[i], 3) + (1 - lam) * F.one_hot(labels[partner], 3)
            torch.testing.assert_close(targets[i], expected.float())
        torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_mixup_blends_images_and_targets_with_the_same_lambda():
    pixel_values, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    mixed, targets, lam, mode = mixup_cutmix(
        pixel_values, labels, 3, np.random.default_rng(0), mixup_alpha=0.8, cutmix_alpha=0, label_smoothing=0.1
    )
    assert mode == "mixup" and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * pixel_values + (1 - lam) * pixel_values.flip(0))
    smoothed = smooth_one_hot(labels, 3, 0.1)
    torch.testing.assert_close(targets, lam * smoothed + (1 - lam) * smoothed.flip(0))
    _, _, lam, mode = mixup_cutmix(pixel_values, labels, 3, np.random.default_rng(0), probability=0.0)
    assert (lam, mode) == (1.0, "none")
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        mixup_cutmix(pixel_values, labels, 3, np.random.default_rng(0), mixup_alpha=0, cutmix_alpha=0)


def test_cutmix_box_is_clipped_to_the_image():
    for seed in range(20):
        top, bottom, left, right = cutmix_box(10, 12, 0.3, np.random.default_rng(seed))
        assert 0 <= top <= bottom <= 10 and 0 <= left <= right <= 12


class RecordingModel(torch.nn.Module):
    """Stands in for the classifier: records its inputs, returns fixed logits."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_labels": 3})()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.calls = []

    def forward(self, pixel_values, superpixels):
        self.calls.append((pixel_values, superpixels))
        return type("Output", (), {"logits": self.weight.expand(pixel_values.shape[0], 3)})()


class SingleProcess:
    process_index = 0


def test_mixed_batches_keep_each_samples_own_superpixels():
    """The original CAST DeiT training mixes the images of a batch but not their superpixels."""
    model = RecordingModel()
    objective = SupervisedObjective(model, mixup_alpha=0.8, cutmix_alpha=1.0, seed=0)
    batch = {
        "pixel_values": torch.randn(4, 3, 16, 16),
        "labels": torch.tensor([0, 1, 2, 0]),
        "superpixels": torch.stack([torch.full((16, 16), i, dtype=torch.long) for i in range(4)]),
    }
    for step in range(4):
        loss, metrics = objective.compute_loss(model, batch, step, 0, SingleProcess())
        pixel_values, superpixels = model.calls[-1]
        assert not torch.equal(pixel_values, batch["pixel_values"])  # images mixed ...
        assert torch.equal(superpixels, batch["superpixels"])  # ... superpixels untouched
        assert 0 < metrics["mix_lambda"] < 1
        assert loss.item() == pytest.approx(np.log(3), rel=1e-5)  # uniform logits: CE of any soft target
    # Mixing is a function of (seed, step, micro-step, rank): a resumed run mixes the same way.
    objective.compute_loss(model, batch, 2, 0, SingleProcess())
    assert torch.equal(model.calls[-1][0], model.calls[2][0])


def test_without_mixing_the_loss_is_label_smoothed_cross_entropy():
    model = TESTER.create_model(CastForImageClassification, train=True)
    objective = SupervisedObjective(model, label_smoothing=0.1, mixup_alpha=0, cutmix_alpha=0)
    torch.manual_seed(1)
    grid = torch.arange(16).reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 4x4 squares
    batch = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "labels": torch.tensor([0, 2]),
        "superpixels": grid.expand(2, -1, -1),
    }
    model.eval()
    loss, metrics = objective.compute_loss(model, batch, 0, 0, SingleProcess())
    logits = model(pixel_values=batch["pixel_values"], superpixels=batch["superpixels"]).logits
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch["labels"], label_smoothing=0.1).item(), rel=1e-5)
    assert "train_accuracy" in metrics


def test_ema_follows_the_weights_with_its_decay(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].num_batches_tracked += 5
    ema.update(model)
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * model.state_dict()[name])
        else:
            assert torch.equal(value, model.state_dict()[name])
    ema.save(tmp_path / "ema.safetensors")
    restored = ModelEma(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), decay=0.9)
    restored.load(tmp_path / "ema.safetensors")
    for name, value in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[name], value)
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.5)


def test_parameter_groups_leave_biases_norms_and_tokens_without_decay():
    model = TESTER.create_model(CastForImageClassification, train=True)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "cast.embeddings.cls_token" in no_decay_names
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert not any(
        name.endswith(("bias", "norm1.weight", "layernorm.weight")) for name in (names[id(p)] for p in decay["params"])
    )
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # the 4th graph pooling
    assert frozen and frozen.isdisjoint(no_decay_names | {names[id(p)] for p in decay["params"]})
    with pytest.raises(ValueError, match="Unknown optimizer"):
        create_optimizer(model, "sgd", 1e-3, 0.0)


def test_lars_scales_the_update_by_the_trust_ratio():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS(
        [{"params": [weight]}, {"params": [bias], "lars_exclude": True}],
        lr=0.1,
        weight_decay=0.5,
        momentum=0.9,
        trust_coefficient=0.01,
    )
    weight.grad, bias.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
    optimizer.step()
    update = torch.tensor([[1.0, 0.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # gradient + weight decay
    trust = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # plain SGD, no decay


def test_transformers_trainer_trains_and_evaluates_the_classifier(tmp_path):
    """`CastForImageClassification` with the transformers `Trainer` on a `datasets.Dataset` whose transform adds
    superpixels (`datasets_transform`)."""
    import datasets
    from PIL import Image
    from transformers import Trainer, TrainingArguments

    from hf_hierseg.image_processing_cast import CastImageProcessor
    from hf_hierseg.training.augment import ProcessorTransform
    from hf_hierseg.training.data import datasets_transform

    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    images = [
        Image.fromarray(np.clip(np.array(colours[i % 3]) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
        for i in range(12)
    ]
    dataset = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(12)]})
    processor = CastImageProcessor(
        superpixel_method="grid", size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
    )
    transform = datasets_transform(ProcessorTransform(processor), "image", "label")
    dataset = dataset.with_transform(transform)
    model = TESTER.create_model(CastForImageClassification, train=True)
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, eval_dataset=dataset)
    before = model.classifier.weight.detach().clone()
    result = trainer.train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model.classifier.weight.detach())
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    predictions = trainer.predict(dataset).predictions
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    assert logits.shape == (12, 3)


def test_a_checkpoint_with_other_classes_needs_ignore_mismatched_sizes(tmp_path):
    """Fine-tuning a 10-class classifier on the 6 synthetic classes stops before training with one line naming
    --ignore_mismatched_sizes and both class counts; a checkpoint without classifier (MoCo) needs no flag."""
    from hf_hierseg.evaluation.synthetic import write_synthetic_dataset
    from hf_hierseg.modeling_cast import CastForSelfSupervisedPretraining
    from hf_hierseg.training.arguments import ModelArguments, supervised_parser
    from hf_hierseg.training.recipes import ClassLabels, build_config, load_or_create, train_supervised

    data = write_synthetic_dataset(tmp_path / "shapes", num_images=6, num_test_images=2, image_size=32)
    TESTER.create_model(CastForImageClassification, train=True, num_labels=10).save_pretrained(tmp_path / "ten")
    arguments = supervised_parser().parse_args_into_dataclasses(
        args=[
            "--dataset_name",
            str(data),
            "--model_name_or_path",
            str(tmp_path / "ten"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
        ]
    )
    with pytest.raises(
        ValueError, match=r"ten has 10 classes and this run 6: .*Pass --ignore_mismatched_sizes"
    ) as error:
        train_supervised(*arguments)
    assert len(str(error.value).splitlines()) == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()

    import datasets

    split = datasets.load_dataset("imagefolder", data_dir=str(data), split="train")
    fields = ClassLabels().config_fields(split)
    ten = ModelArguments(model_name_or_path=str(tmp_path / "ten"))
    model = load_or_create(CastForImageClassification, ten, build_config(ten, **fields), ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 6
    CastForSelfSupervisedPretraining(TESTER.get_config()).save_pretrained(tmp_path / "moco")
    moco = ModelArguments(model_name_or_path=str(tmp_path / "moco"))
    model = load_or_create(CastForImageClassification, moco, build_config(moco, **fields))
    assert model.classifier.out_features == 6 and model.config.id2label == fields["id2label"]
