"""MoCo v3: the converted original checkpoint's projector / predictor, the contrastive loss, the momentum encoder
and its schedule, learning on a fixed batch, and resuming training from a converted checkpoint."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_hierseg import CastForSelfSupervisedPretraining
from hf_hierseg.convert import convert_state, momentum_encoder_from_original, parse_overrides
from hf_hierseg.training.moco import CastMocoV3, MocoObjective, contrastive_loss
from hf_hierseg.training.optim import cosine_momentum

from cast_testing import CastModelTester, grid_superpixels


TINY_OVERRIDES = ["num_attention_heads=4", "num_clusters=16,8,4,2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; fixtures made with one thread


@pytest.fixture(scope="module")
def tiny_moco(request):
    shared = request.getfixturevalue("shared_dir")
    folder = shared / "fixtures" / "original_cast" / "tiny_moco"
    checkpoint = torch.load(folder / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    return folder, checkpoint


TESTER = CastModelTester(image_size=32, projection_dim=16, projection_hidden_dim=32)


def tiny_model(**overrides):
    """A MoCo-v3 CAST in training mode."""
    return TESTER.create_model(CastForSelfSupervisedPretraining, train=True, **overrides)


def test_converted_moco_checkpoint_gives_the_original_projector_and_predictor_outputs(tiny_moco):
    folder, checkpoint = tiny_moco
    model, report = convert_state(checkpoint, None, parse_overrides(TINY_OVERRIDES))
    assert isinstance(model, CastForSelfSupervisedPretraining)
    inputs = load_file(folder / "inputs.safetensors")
    expected = load_file(folder / "expected.safetensors")
    model.eval()
    with torch.no_grad():
        output = model(pixel_values=inputs["pixel_values"], superpixels=inputs["superpixels"])
    torch.testing.assert_close(output.pooler_output, expected["out4"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.projections, expected["head"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.predictions, expected["predictor"], atol=1e-4, rtol=1e-4)


def test_momentum_encoder_of_the_original_checkpoint_is_loaded(tiny_moco):
    _, checkpoint = tiny_moco
    model, _ = convert_state(checkpoint, None, parse_overrides(TINY_OVERRIDES))
    moco = CastMocoV3(model)
    # Starts as a copy of the base encoder, as MoCo does ...
    assert torch.equal(moco.momentum_encoder.cast.embeddings.cls_token, model.cast.embeddings.cls_token)
    # ... or takes the original momentum encoder, which differs from the base encoder in this checkpoint.
    moco.load_momentum_encoder(momentum_encoder_from_original(checkpoint, model.config))
    state = checkpoint["state_dict"]
    pairs = {
        "cast.embeddings.cls_token": "module.momentum_encoder.cls_token",
        "cast.levels.0.blocks.0.attn.qkv.weight": "module.momentum_encoder.blocks1.0.attn.qkv.weight",
        "projector.0.weight": "module.momentum_encoder.head.0.weight",
        "projector.7.running_var": "module.momentum_encoder.head.7.running_var",
    }
    momentum_state = moco.momentum_encoder.state_dict()
    for ours, original in pairs.items():
        assert torch.equal(momentum_state[ours], state[original]), ours
        assert not torch.equal(model.state_dict()[ours], state[original]), ours
    assert not any(parameter.requires_grad for parameter in moco.momentum_encoder.parameters())
    with pytest.raises(ValueError, match="momentum_encoder"):
        momentum_encoder_from_original({"state_dict": {"cls_token": torch.zeros(1)}}, model.config)


def test_contrastive_loss_is_two_tau_times_infonce_with_positives_at_this_ranks_rows():
    torch.manual_seed(0)
    queries, keys, tau = torch.randn(4, 8), torch.randn(8, 8), 0.2  # keys of 2 processes, this one is rank 1
    q = queries / queries.norm(dim=1, keepdim=True)
    k = keys / keys.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(4):
        scores = [math.exp(float(q[i] @ k[j]) / tau) for j in range(8)]
        expected += -math.log(scores[4 + i] / sum(scores))
    expected = 2 * tau * expected / 4
    assert contrastive_loss(queries, keys, tau, rank=1).item() == pytest.approx(expected, rel=1e-5)
    assert contrastive_loss(queries, keys[:4], tau).item() != pytest.approx(expected, rel=1e-3)


def test_momentum_schedule_goes_from_base_to_one_along_a_cosine():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(25, 100) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)


def test_momentum_update_and_gradients_flow_only_through_the_base_encoder():
    moco = CastMocoV3(tiny_model())
    with torch.no_grad():
        for parameter in moco.model.parameters():
            parameter.add_(0.1)
    before = {name: value.clone() for name, value in moco.momentum_encoder.named_parameters()}
    base = dict(moco.model.named_parameters())
    moco.update_momentum_encoder(0.9)
    for name, value in moco.momentum_encoder.named_parameters():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * base[name])

    pixel_values = torch.randn(4, 2, 3, 32, 32)
    superpixels = grid_superpixels(4, 32, cell=8)[:, None].expand(-1, 2, -1, -1)
    output = moco(pixel_values, superpixels)
    loss = contrastive_loss(output.predictions[0], output.keys[1], 0.2) + contrastive_loss(
        output.predictions[1], output.keys[0], 0.2
    )
    loss.backward()
    assert all(parameter.grad is None for parameter in moco.momentum_encoder.parameters())
    assert moco.model.predictor[0].weight.grad.abs().sum() > 0
    assert moco.model.cast.embeddings.patch_embeddings.proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="two views"):
        moco(pixel_values[:, 0], superpixels[:, 0])


class SingleProcess:
    """The two members of `Accelerator` that `MocoObjective.compute_loss` uses, for one process."""

    process_index = 0

    @staticmethod
    def gather(tensor):
        return tensor


def test_moco_objective_learns_to_match_the_views_of_a_fixed_batch():
    torch.manual_seed(0)
    objective = MocoObjective(tiny_model(pooling_dropout_prob=0.0), temperature=0.2)  # less noise for 15 steps
    images = torch.randn(8, 1, 3, 32, 32)
    batch = {
        "pixel_values": torch.cat([images, images + 0.3 * torch.randn(8, 1, 3, 32, 32)], dim=1),  # two noisy views
        "superpixels": grid_superpixels(8, 32, cell=8)[:, None].expand(-1, 2, -1, -1),
    }
    module = objective.training_module()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        loss, _ = objective.compute_loss(module, batch, step, 0, SingleProcess())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        module.update_momentum_encoder(cosine_momentum(step + 1, 15))
        losses.append(loss.item())
    # Each view's positive is found among the 8 keys: the loss falls below 2 * (2 tau ln 8), its value for
    # uniform similarities, and well below where it started.
    assert np.mean(losses[-3:]) < min(0.6 * losses[0], 2 * 2 * 0.2 * np.log(8))


def test_moco_needs_the_self_supervised_model():
    from hf_hierseg import CastModel

    with pytest.raises(TypeError, match="CastForSelfSupervisedPretraining"):
        CastMocoV3(CastModel(tiny_model().config))


def test_training_resumes_from_a_converted_original_moco_checkpoint(tiny_moco, tmp_path):
    """Convert the authors' MoCo checkpoint, train 2 steps from it (base encoder from the converted folder,
    momentum encoder from the original file): the weights start where the original run stopped."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoModel

    from hf_hierseg.evaluation.synthetic import write_synthetic_dataset
    from hf_hierseg.training.arguments import moco_parser
    from hf_hierseg.training.recipes import train_moco

    folder, checkpoint = tiny_moco
    converted, _ = convert_state(checkpoint, None, parse_overrides(TINY_OVERRIDES))
    converted.save_pretrained(tmp_path / "converted")
    data = write_synthetic_dataset(
        tmp_path / "shapes", num_images=8, num_test_images=1, image_size=64, format="parquet"
    )
    output_dir = tmp_path / "resumed"
    arguments = moco_parser().parse_args_into_dataclasses(
        args=[
            "--dataset_name",
            str(data / "data"),
            "--model_name_or_path",
            str(tmp_path / "converted"),
            "--momentum_encoder_checkpoint",
            str(folder / "checkpoint_0000.pth.tar"),
            "--num_superpixels",
            "600",
            "--output_dir",
            str(output_dir),
            "--per_device_train_batch_size",
            "4",
            "--max_train_steps",
            "2",
            "--learning_rate",
            "1e-6",
            "--checkpointing_steps",
            "2",
            "--report_to",
            "none",
        ]
    )
    try:
        train_moco(*arguments)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    trained = CastForSelfSupervisedPretraining.from_pretrained(output_dir)
    assert type(AutoModel.from_pretrained(output_dir)).__name__ == "CastModel"
    start = dict(converted.named_parameters())
    for name, parameter in trained.named_parameters():  # AdamW steps of ~1e-6 from the converted weights
        assert (parameter - start[name]).abs().max() < 1e-4, name
    assert not torch.equal(trained.projector[0].weight, converted.projector[0].weight)
    # Momentum after the first step is 0.995 (cosine schedule over 2 steps), then 1: k = 0.995 k0 + 0.005 q.
    state = load_file(output_dir / "checkpoint-2" / "model.safetensors")
    original = checkpoint["state_dict"]
    for ours, theirs in (("cls_token", "cls_token"), ("levels.1.blocks.0.mlp.fc1.weight", "blocks2.1.mlp.fc1.weight")):
        expected = (
            0.995 * original[f"module.momentum_encoder.{theirs}"] + 0.005 * original[f"module.base_encoder.{theirs}"]
        )
        key = f"momentum_encoder.cast.{'embeddings.' if ours == 'cls_token' else ''}{ours}"
        torch.testing.assert_close(state[key], expected, atol=1e-5, rtol=0)
