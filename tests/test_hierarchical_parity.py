"""Converted H-CAST checkpoints reproduce the authors' numbers on both fixtures (../shared/fixtures/original_hcast):
every per-level logit, the CAST intermediates, the CLS features the heads read, and the loss (per level, tree-path
KL, total) with and without label smoothing, at atol = rtol = 1e-4; integer tensors exactly."""

import pytest
import torch
from safetensors.torch import load_file
from test_parity import collect_outputs

from hf_hierseg import CastForHierarchicalImageClassification
from hf_hierseg.convert import convert_state, load_original_checkpoint, parse_overrides, read_taxonomy
from hf_hierseg.modeling_cast import hierarchy_targets, soft_target_cross_entropy, tree_path_kl


TINY_OVERRIDES = ["num_attention_heads=4", "num_clusters=16,8,4,2"]
FIXTURES = {"tiny_hcast_2level": 2, "tiny_hcast_3level": 3}
# The CLS feature each label level reads (DATA.md): 3 levels out2, out3, out4; 2 levels out3, out4.
FEATURE_NAMES = {2: ("out3", "out4"), 3: ("out2", "out3", "out4")}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures were made with one thread
    yield
    torch.set_num_threads(threads)


def fixture_dir(shared_dir, name):
    return shared_dir / "fixtures" / "original_hcast" / name


def converted(shared_dir, name, overrides=()):
    fixture = fixture_dir(shared_dir, name)
    checkpoint = load_original_checkpoint(fixture / "checkpoint.pth")
    taxonomy = read_taxonomy(fixture / "taxonomy.json")
    model, _ = convert_state(checkpoint, None, parse_overrides([*TINY_OVERRIDES, *overrides]), taxonomy)
    return model


def level_targets(inputs, num_levels):
    return torch.stack([inputs[f"targets_level{level}"] for level in range(num_levels)], dim=1)  # [B, L]


def assert_matches(got, expected, key):
    assert got.shape == expected.shape, key
    if expected.is_floating_point():
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    else:
        assert got.dtype == expected.dtype and torch.equal(got, expected), key


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_logit_and_intermediate_matches_the_authors(shared_dir, name, attn_implementation):
    num_levels = FIXTURES[name]
    model = converted(shared_dir, name)
    assert type(model) is CastForHierarchicalImageClassification
    assert model.config.hierarchy_cast_levels == ((3, 4) if num_levels == 2 else (2, 3, 4))
    model.set_attn_implementation(attn_implementation)
    inputs = load_file(fixture_dir(shared_dir, name) / "inputs.safetensors")
    expected = load_file(fixture_dir(shared_dir, name) / "expected.safetensors")

    got = collect_outputs(model.cast, inputs)  # the backbone's intermediates under the original names
    with torch.no_grad():
        outputs = model(inputs["pixel_values"], inputs["superpixels"])
        features = model.level_features(model.cast(inputs["pixel_values"], inputs["superpixels"]))
    assert len(outputs.logits_per_level) == num_levels
    for level in range(num_levels):
        got[f"logits_level{level}"] = outputs.logits_per_level[level]
    got["out2"], got["out3"] = outputs.level_hidden_states[1][:, 0], outputs.level_hidden_states[2][:, 0]
    torch.testing.assert_close(outputs.logits, outputs.logits_per_level[0], atol=0, rtol=0)
    for feature_name, feature in zip(FEATURE_NAMES[num_levels], features, strict=True):  # what the heads read
        assert_matches(feature, expected[feature_name], feature_name)

    compared = set()
    for key, value in expected.items():
        if key.startswith(("loss", "gk_")):
            continue  # the loss, below
        assert key in got, f"{key} is not produced by the port"
        assert_matches(got[key], value, key)
        compared.add(key)
    assert {f"logits_level{level}" for level in range(num_levels)} <= compared
    assert {"out4", "block_out1", "sampled_inds4", "padding_mask1", "centroid4", "embeddings"} <= compared


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("smoothing, prefix", [(0.0, "loss_"), (0.1, "loss_ls_")])
def test_loss_matches_the_authors(shared_dir, name, smoothing, prefix):
    num_levels = FIXTURES[name]
    model = converted(shared_dir, name, [f"hierarchy_label_smoothing={smoothing}"])
    assert model.config.hierarchy_label_smoothing == smoothing and model.config.tree_path_kl_weight == 0.5
    inputs = load_file(fixture_dir(shared_dir, name) / "inputs.safetensors")
    expected = load_file(fixture_dir(shared_dir, name) / "expected.safetensors")
    labels = level_targets(inputs, num_levels)

    with torch.no_grad():
        outputs = model(inputs["pixel_values"], inputs["superpixels"], labels=labels)
    assert_matches(outputs.loss, expected[f"{prefix}total"], f"{prefix}total")

    # The terms, from the port's own logits.
    targets = hierarchy_targets(labels, model.config.hierarchy_num_labels, smoothing)
    for level in range(num_levels):
        loss = soft_target_cross_entropy(outputs.logits_per_level[level], targets[level])
        assert_matches(loss, expected[f"{prefix}level{level}"], f"{prefix}level{level}")
    kl = tree_path_kl(outputs.logits_per_level, targets)
    assert_matches(kl, expected[f"{prefix}gk"], f"{prefix}gk")
    # The joint target (coarsest first, normalised per row) and joint log-probabilities of the tree-path KL term.
    joint_targets = torch.cat(targets[::-1], dim=1)
    joint_targets = joint_targets / joint_targets.sum(1, keepdim=True)
    assert_matches(joint_targets, expected["gk_targets_ls" if smoothing else "gk_targets"], "gk_targets")
    joint = torch.cat(outputs.logits_per_level[::-1], dim=1).log_softmax(dim=1)
    assert_matches(joint, expected["gk_log_probs"], "gk_log_probs")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_dense_targets_give_the_same_loss_as_labels(shared_dir, name):
    # Dense targets (what Mixup / CutMix hand the model) side by side [B, sum(n)] or per level: same loss as the
    # smoothed one-hot targets built from integer labels.
    num_levels = FIXTURES[name]
    model = converted(shared_dir, name, ["hierarchy_label_smoothing=0.1"])
    inputs = load_file(fixture_dir(shared_dir, name) / "inputs.safetensors")
    expected = load_file(fixture_dir(shared_dir, name) / "expected.safetensors")
    targets = hierarchy_targets(level_targets(inputs, num_levels), model.config.hierarchy_num_labels, 0.1)
    with torch.no_grad():
        for labels in (torch.cat(targets, dim=1), targets):
            loss = model(inputs["pixel_values"], inputs["superpixels"], labels=labels).loss
            assert_matches(loss, expected["loss_ls_total"], "loss_ls_total")
