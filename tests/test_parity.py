"""Converted checkpoints reproduce every tensor the authors' code computes on the fixtures."""

import pytest
import torch
from safetensors.torch import load_file

from hf_hierseg.convert import convert_state, load_original_checkpoint, parse_overrides


TINY_OVERRIDES = ["num_attention_heads=4", "num_clusters=16,8,4,2"]
FIXTURES = {"tiny_moco": "checkpoint_0000.pth.tar", "tiny_deit": "checkpoint.pth"}
# MoCo's projector (`head`) and predictor outputs are checked by the self-supervised training tests.
CHECKED_ELSEWHERE = {"tiny_moco": {"head", "predictor"}, "tiny_deit": set()}


def collect_outputs(model, inputs):
    """Our outputs under the original's names."""
    backbone = getattr(model, "cast", model)
    with torch.no_grad():
        out = backbone(inputs["pixel_values"], inputs["superpixels"], output_hidden_states=True)
        got = {
            "patch_embed": backbone.embeddings.patch_embeddings(inputs["pixel_values"]),
            "embeddings": out.hidden_states[0],
            "out4": out.pooler_output,
        }
        if hasattr(model, "classifier"):
            got["head"] = model.classifier(out.pooler_output)
    for level in range(4):
        name = level + 1
        got[f"block_out{name}"] = out.level_hidden_states[level]
        got[f"block{name}"] = out.level_hidden_states[level][:, 1:]
        got[f"logit{name}"] = out.assignment_logits[level]
        got[f"sampled_inds{name}"] = out.sampled_indices[level]
        got[f"padding_mask{name}"] = out.padding_masks[level]
        got[f"centroid{name}"] = out.pooled_hidden_states[level][:, 1:]
        got[f"cls_token{name}"] = out.pooled_hidden_states[level][:, :1]
    return got


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures were made with one thread
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_tensor_matches_original(shared_dir, name, attn_implementation):
    fixture = shared_dir / "fixtures" / "original_cast" / name
    checkpoint = load_original_checkpoint(fixture / FIXTURES[name])
    model, _ = convert_state(checkpoint, None, parse_overrides(TINY_OVERRIDES))
    model.set_attn_implementation(attn_implementation)
    inputs = load_file(fixture / "inputs.safetensors")
    expected = load_file(fixture / "expected.safetensors")
    got = collect_outputs(model, inputs)

    compared = set()
    for key, value in expected.items():
        if key in CHECKED_ELSEWHERE[name]:
            continue
        assert key in got, f"{key} is not produced by the port"
        assert got[key].shape == value.shape, key
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")
        else:
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        compared.add(key)
    assert len(compared) == len(expected) - len(CHECKED_ELSEWHERE[name])
