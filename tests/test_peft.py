"""LoRA on CAST through peft's API: which layers get adapters, what trains, adapter round trip, merging."""

import pytest
import torch
from peft import PeftModel
from torch import nn

from hf_hierseg import CastForImageClassification, CastModel
from hf_hierseg.peft_utils import LORA_TARGET_MODULES, add_lora, cast_lora_config

from cast_testing import CastModelTester


# A regular grid of 9 px superpixels: ceil(64 / 9)^2 = 64 segments.
TESTER = CastModelTester(superpixel_cell=9)


@pytest.fixture
def inputs():
    return TESTER.prepare_inputs()


@pytest.fixture
def classifier():
    return TESTER.create_model(CastForImageClassification)


def lora_wrapped_names(model):
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))


def test_lora_wraps_exactly_the_linear_layers_of_blocks_and_centroid_attention(classifier):
    # Independent expectation: every nn.Linear whose own name is a target, wherever it is, except nothing else.
    expected = sorted(
        "base_model.model." + name
        for name, module in classifier.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in LORA_TARGET_MODULES
    )
    model = add_lora(classifier, r=4)
    wrapped = lora_wrapped_names(model)
    assert wrapped == expected
    # 4 levels x (qkv, proj, fc1, fc2 of one block + qkv, proj of the centroid attention)
    assert len(wrapped) == 4 * 6
    assert all(".levels." in name for name in wrapped)
    assert not any("patch_embeddings" in name for name in wrapped)


def test_only_adapter_and_classifier_parameters_train(classifier, inputs):
    model = add_lora(classifier, r=4)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_" in name or "classifier.modules_to_save" in name for name in trainable)
    assert any("classifier.modules_to_save" in name for name in trainable)

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss = model(**inputs, labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed, "one SGD step changed nothing"
    assert changed <= trainable
    assert any("lora_B" in name for name in changed) and any("modules_to_save" in name for name in changed)


def test_adapter_save_and_load_round_trip(classifier, inputs, tmp_path):
    base_state = {name: tensor.clone() for name, tensor in classifier.state_dict().items()}
    model = add_lora(classifier, r=4, init_lora_weights=False).eval()  # random A and B: the adapter changes outputs
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh = CastForImageClassification(TESTER.get_config(num_labels=3))
    fresh.load_state_dict(base_state)
    with torch.no_grad():
        plain = fresh.eval()(**inputs).logits
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        restored = loaded(**inputs).logits
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)
    assert not torch.allclose(plain, expected, atol=1e-4), "the adapter did not change the outputs"


def test_merged_model_matches_unmerged(classifier, inputs):
    model = add_lora(classifier, r=4, init_lora_weights=False).eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
    merged = model.merge_and_unload().eval()
    assert type(merged) is CastForImageClassification
    assert not lora_wrapped_names(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_lora_on_the_backbone_without_head(inputs):
    model = add_lora(TESTER.create_model(CastModel, train=True), r=2, modules_to_save=None).eval()
    assert len(lora_wrapped_names(model)) == 24
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert model(**inputs).pooler_output.shape == (2, 24)


def test_lora_config_and_bad_model():
    config = cast_lora_config(r=2)
    assert sorted(config.target_modules) == sorted(LORA_TARGET_MODULES)
    assert config.modules_to_save == ["classifier"]
    with pytest.raises(TypeError, match="CAST model"):
        add_lora(nn.Linear(2, 2))


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=64):
    """A tiny imagefolder dataset of smooth random pictures."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                picture = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(picture).resize((size, size), Image.BICUBIC).save(folder / f"{index}.png")


def lora_arguments(base, data, out, *extra):
    """The dataclasses of `finetune_lora` for a 2-step streamed run."""
    from hf_hierseg.training.arguments import lora_parser

    return lora_parser().parse_args_into_dataclasses(
        args=[
            "--model_name_or_path",
            str(base),
            "--dataset_name",
            str(data),
            "--streaming",
            "--max_train_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "2",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
            "--learning_rate",
            "0.05",
            "--superpixel_method",
            "grid",
            *extra,
        ]
    )


@pytest.mark.slow
def test_finetune_script_trains_streamed_data_and_saves_adapter_and_merged_model(tmp_path, inputs):
    from transformers import AutoModelForImageClassification

    from hf_hierseg.image_processing_cast import CastImageProcessor
    from hf_hierseg.training.lora import finetune_lora

    write_image_folder(tmp_path / "data")
    TESTER.create_model(CastForImageClassification, num_labels=2).save_pretrained(tmp_path / "base")
    out = tmp_path / "lora"
    metrics = finetune_lora(*lora_arguments(tmp_path / "base", tmp_path / "data", out, "--save_merged"))
    assert metrics["train_steps"] == 2 and metrics["eval_samples"] == 6
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    # The merged model carries the run's image processor (DeiT's SEEDS path and bicubic resizing, grid here).
    assert (
        CastImageProcessor.from_pretrained(out / "merged").to_dict()
        == CastImageProcessor.from_pretrained(out).to_dict()
    )
    assert CastImageProcessor.from_pretrained(out).superpixel_recipe == "supervised"

    base = AutoModelForImageClassification.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        before = base.eval()(**inputs).logits
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForImageClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        after = adapted(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, after, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after), "two steps at lr 0.05 left the classifier unchanged"


def test_finetuning_a_classifier_of_other_classes_needs_ignore_mismatched_sizes(tmp_path):
    """A 10-class checkpoint on 2 classes: a one-line error naming the flag and both counts, before any training;
    with the flag the classifier starts anew."""
    from hf_hierseg.training.lora import finetune_lora

    write_image_folder(tmp_path / "data")
    TESTER.create_model(CastForImageClassification, num_labels=10).save_pretrained(tmp_path / "ten")
    out = tmp_path / "lora"
    with pytest.raises(ValueError, match=r"has 10 classes and this run 2: .*Pass --ignore_mismatched_sizes") as error:
        finetune_lora(*lora_arguments(tmp_path / "ten", tmp_path / "data", out))
    assert len(str(error.value).splitlines()) == 1
    assert not (out / "adapter_model.safetensors").exists()

    metrics = finetune_lora(*lora_arguments(tmp_path / "ten", tmp_path / "data", out, "--ignore_mismatched_sizes"))
    assert metrics["train_steps"] == 2
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    classifier = [tuple(tensor.shape) for name, tensor in saved.items() if "classifier" in name]
    assert (2, 24) in classifier and (10, 24) not in classifier  # the new 2-class classifier was trained and saved
