"""CastForHierarchicalImageClassification and the taxonomy of CastConfig: validation with named errors, the JSON
round trip, Auto classes, which CLS token each level reads, labels, starting from CAST checkpoints."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

from hf_hierseg import CastConfig, CastForHierarchicalImageClassification, CastForImageClassification, CastModel
from hf_hierseg.modeling_cast import hierarchy_targets

from cast_testing import CONFIG_DEFAULT, TAXONOMY_NAMES, TAXONOMY_PARENTS, CastModelTester, random_superpixels


# species -> genus -> family: 6 -> 3 -> 2 (the tester's taxonomy).
PARENTS, NAMES = TAXONOMY_PARENTS, TAXONOMY_NAMES
TESTER = CastModelTester()


def plain_config(**kwargs):
    """The same CAST without a taxonomy."""
    return TESTER.get_config(**{"num_labels": CONFIG_DEFAULT, **kwargs})


def inputs(batch=2, seed=0):
    """20 irregular segments (a random label per 4 px block) and random pixels."""
    generator = torch.Generator().manual_seed(seed)
    superpixels = random_superpixels(batch, 64, num_segments=20, generator=generator)
    return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=generator), "superpixels": superpixels}


@pytest.fixture(scope="module")
def model():
    return TESTER.create_model(CastForHierarchicalImageClassification, TESTER.get_hierarchical_config())


# -- the taxonomy in the config ----------------------------------------------------------------------------------


def test_taxonomy_defaults_and_finest_level_as_id2label():
    config = CastConfig(hierarchy_num_labels=[4, 2], hierarchy_parents=[[0, 1, 1, 0]])
    assert config.hierarchy_num_labels == (4, 2) and config.hierarchy_parents == ((0, 1, 1, 0),)
    assert config.hierarchy_cast_levels == (3, 4)  # the authors' mapping for 2 levels
    assert config.hierarchy_level_names == ("rank0", "rank1")
    assert config.hierarchy_id2label[1] == {0: "LABEL_0", 1: "LABEL_1"}
    assert config.num_labels == 4 and config.id2label == config.hierarchy_id2label[0]
    assert config.hierarchy_paths() == ((0, 0), (1, 1), (2, 1), (3, 0))
    three = TESTER.get_hierarchical_config()
    assert three.hierarchy_cast_levels == (2, 3, 4) and three.label2id["species5"] == 5
    assert three.hierarchy_paths()[3] == (3, 1, 1)
    named = CastConfig(hierarchy_num_labels=(2, 1), hierarchy_parents=((0, 0),), id2label={0: "cat", 1: "dog"})
    assert named.hierarchy_id2label[0] == {0: "cat", 1: "dog"}  # the finest names from id2label
    plain = CastConfig()
    assert plain.hierarchy_num_labels == () and plain.hierarchy_paths() == ()


def test_taxonomy_round_trips_through_json(tmp_path):
    config = TESTER.get_hierarchical_config(
        hierarchy_cast_levels=(4, 4, 4), hierarchy_label_smoothing=0.1, tree_path_kl_weight=1.0
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hierarchy_id2label"][1] == {"0": "genus0", "1": "genus1", "2": "genus2"}
    loaded = AutoConfig.from_pretrained(tmp_path)
    for name in (
        "hierarchy_num_labels",
        "hierarchy_parents",
        "hierarchy_id2label",
        "hierarchy_level_names",
        "hierarchy_cast_levels",
        "hierarchy_label_smoothing",
        "tree_path_kl_weight",
        "id2label",
    ):
        assert getattr(loaded, name) == getattr(config, name), name
    assert isinstance(loaded.hierarchy_num_labels, tuple) and isinstance(loaded.hierarchy_parents[0], tuple)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hierarchy_num_labels=(6,), hierarchy_parents=()), "2 to 4 label levels"),
        (dict(hierarchy_num_labels=(6, 3, 0), hierarchy_parents=PARENTS), "positive class counts"),
        (dict(hierarchy_parents=PARENTS[:1]), "one list per level but the coarsest"),
        (dict(hierarchy_parents=((0, 0, 1, 1, 2), PARENTS[1])), "parent of each of the 6 classes of level 0"),
        (dict(hierarchy_parents=((0, 0, 1, 1, 2, 3), PARENTS[1])), r"hierarchy_parents\[0\]\[5\]` = 3 is not a class"),
        (dict(hierarchy_parents=((0, 0, 1, 1, 1, 1), PARENTS[1])), r"Classes \[2\] of level 1 are no class's parent"),
        (dict(hierarchy_parents=(PARENTS[0], (0, 0, 0))), r"Classes \[1\] of level 2"),
        (dict(hierarchy_id2label=NAMES[:2]), "`hierarchy_id2label` needs one entry per level"),
        (dict(hierarchy_id2label=(NAMES[0], {0: "a", 1: "b", 5: "c"}, NAMES[2])), "must name the classes 0..2"),
        (dict(hierarchy_level_names=("a", "a", "b")), "must be distinct"),
        (dict(hierarchy_cast_levels=(0, 3, 4)), "CAST levels 1..4"),
        (dict(hierarchy_cast_levels=(3, 4)), "`hierarchy_cast_levels` needs one entry per level"),
        (dict(hierarchy_label_smoothing=1.0), "hierarchy_label_smoothing"),
        (dict(tree_path_kl_weight=-1.0), "tree_path_kl_weight"),
        (dict(hierarchy_num_labels=6), "must be a list"),
        (dict(hierarchy_parents=(1, 2)), "one list of parent ids per level"),
        (dict(hierarchy_id2label=None, id2label={0: "a", 1: "b"}), "give 2 classes"),
    ],
)
def test_taxonomy_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TESTER.get_hierarchical_config(**kwargs)


def test_taxonomy_fields_need_class_counts():
    with pytest.raises(ValueError, match="give `hierarchy_num_labels`"):
        CastConfig(hierarchy_parents=PARENTS)


def test_model_needs_a_taxonomy():
    with pytest.raises(ValueError, match="needs a taxonomy"):
        CastForHierarchicalImageClassification(plain_config())


# -- the model ---------------------------------------------------------------------------------------------------


def test_levels_read_the_cls_of_their_cast_level(model):
    batch = inputs()
    with torch.no_grad():
        outputs = model(**batch)
    assert [tuple(z.shape) for z in outputs.logits_per_level] == [(2, 6), (2, 3), (2, 2)]
    assert outputs.logits is outputs.logits_per_level[0]
    # level 0 <- CLS after level 2's blocks (no norm), level 1 <- level 3's, level 2 <- the final-normed CLS.
    cls_after_blocks = [hidden[:, 0] for hidden in outputs.level_hidden_states]
    expected = [
        model.classifier[0](cls_after_blocks[1]),
        model.classifier[1](cls_after_blocks[2]),
        model.classifier[2](outputs.pooler_output),
    ]
    for got, want in zip(outputs.logits_per_level, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(outputs.pooler_output, model.cast.layernorm(cls_after_blocks[3]), atol=0, rtol=0)
    assert len(outputs.hierarchy) == 4 and outputs.hierarchy[0].shape == batch["superpixels"].shape[:1] + (20,)


def test_tester_checks_on_irregular_superpixels():
    """The shared checks (logits per level, loss, the taxonomy's tree, the nesting hierarchy) on 20 segments."""
    batch = inputs()
    config = TESTER.get_hierarchical_config()
    TESTER.create_and_check_for_hierarchical_image_classification(config, batch["pixel_values"], batch["superpixels"])


def test_flat_baseline_reads_every_level_from_the_final_cls(model):
    flat = CastForHierarchicalImageClassification(
        TESTER.get_hierarchical_config(hierarchy_cast_levels=(4, 4, 4))
    ).eval()
    flat.load_state_dict(model.state_dict())
    with torch.no_grad():
        outputs = flat(**inputs())
    for head, logits in zip(flat.classifier, outputs.logits_per_level, strict=True):
        torch.testing.assert_close(logits, head(outputs.pooler_output), atol=0, rtol=0)


def test_loss_backpropagates_to_every_head_and_level(model):
    trained = CastForHierarchicalImageClassification(TESTER.get_hierarchical_config()).train()
    trained.load_state_dict(model.state_dict())
    labels = torch.tensor([[0, 0, 0], [5, 2, 1]])
    loss = trained(**inputs(), labels=labels).loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for head in trained.classifier:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert trained.cast.levels[1].blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_loss_terms_by_hand(model):
    # One-hot labels: the loss is the sum of the levels' cross-entropies plus 0.5 x KL(q || softmax over all 11
    # logits), q = 1/3 on each level's true class, i.e. 0.5 x mean_b [log(1/3) - (1/3) sum_k log p(true class k)].
    labels = torch.tensor([[3, 1, 1], [4, 2, 1]])
    with torch.no_grad():
        outputs = model(**inputs(), labels=labels)
    cross_entropy = sum(
        torch.nn.functional.cross_entropy(z, labels[:, level]) for level, z in enumerate(outputs.logits_per_level)
    )
    joint = torch.cat(outputs.logits_per_level, dim=1).log_softmax(dim=1)  # finest first: same value
    offsets = torch.tensor([0, 6, 9])
    picked = joint.gather(1, labels + offsets)  # [B, 3] log-probability of each level's true class
    kl = (torch.log(torch.tensor(1 / 3)) - picked.mean(dim=1)).mean()
    torch.testing.assert_close(outputs.loss, cross_entropy + 0.5 * kl, atol=1e-5, rtol=1e-5)


def test_swapped_loss_function_is_used(model):
    swapped = CastForHierarchicalImageClassification(TESTER.get_hierarchical_config()).eval()
    swapped.load_state_dict(model.state_dict())
    swapped.loss_function = lambda labels, logits_per_level, config, **kwargs: logits_per_level[-1].sum()
    with torch.no_grad():
        outputs = swapped(**inputs(), labels=torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(outputs.loss, outputs.logits_per_level[-1].sum())


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([[0, 0], [1, 1]]), r"int64 \[B, 3\]"),
        (torch.tensor([[0, 0, 2], [1, 1, 0]]), "outside the levels' ranges"),
        (torch.tensor([[-1, 0, 0], [1, 1, 0]]), "outside the levels' ranges"),
        (torch.zeros(2, 3, dtype=torch.bool), r"int64 \[B, 3\]"),
        (torch.zeros(2, 10), r"Dense `labels` must be \[B, 11\]"),
        ([torch.zeros(2, 6), torch.zeros(2, 3)], "3 float tensors"),
        ([[0, 0, 0]], "3 float tensors"),
        ("species0", "must be a tensor"),
    ],
)
def test_bad_labels_are_named(model, labels, message):
    with pytest.raises(ValueError, match=message):
        model(**inputs(), labels=labels)


def test_smoothed_targets():
    targets = hierarchy_targets(torch.tensor([[1, 0]]), (4, 2), label_smoothing=0.2)
    torch.testing.assert_close(targets[0], torch.tensor([[0.05, 0.85, 0.05, 0.05]]))
    torch.testing.assert_close(targets[1], torch.tensor([[0.9, 0.1]]))


# -- loading -----------------------------------------------------------------------------------------------------


def test_auto_class_picks_the_hierarchical_class_by_architecture(tmp_path, model):
    model.save_pretrained(tmp_path / "hcast")
    saved = json.loads((tmp_path / "hcast" / "config.json").read_text())
    assert saved["architectures"] == ["CastForHierarchicalImageClassification"]
    assert saved["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_cast.CastForHierarchicalImageClassification"
    )
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hcast").eval()
    assert type(loaded) is CastForHierarchicalImageClassification
    batch = inputs()
    with torch.no_grad():
        for got, want in zip(loaded(**batch).logits_per_level, model(**batch).logits_per_level, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    # The flat classifier keeps the Auto class for its own folders and for fresh configs.
    CastForImageClassification(plain_config()).save_pretrained(tmp_path / "flat")
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "flat")) is CastForImageClassification
    fresh = AutoModelForImageClassification.from_config(plain_config())
    assert type(fresh) is CastForImageClassification


def test_starts_from_a_backbone_or_classifier_with_new_level_heads(tmp_path, model):
    torch.manual_seed(1)
    backbone = CastModel(plain_config()).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    classifier = CastForImageClassification(plain_config(num_labels=6)).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    taxonomy = {k: v for k, v in TESTER.get_hierarchical_config().to_dict().items() if k.startswith("hierarchy_")}
    for folder, source in (("backbone", backbone), ("classifier", classifier.cast)):
        config = CastConfig.from_pretrained(tmp_path / folder, **taxonomy)
        started = CastForHierarchicalImageClassification.from_pretrained(tmp_path / folder, config=config)
        for name, tensor in source.state_dict().items():
            torch.testing.assert_close(started.cast.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
        assert started.classifier[0].weight.shape == (6, 24) and started.classifier[2].bias.abs().sum() == 0
        assert started.classifier[1].weight.std() < 0.05  # truncated normal 0.02, the authors' head init
    # And the backbone loads from an H-CAST folder without the heads.
    model.save_pretrained(tmp_path / "hcast")
    reloaded = CastModel.from_pretrained(tmp_path / "hcast")
    torch.testing.assert_close(reloaded.layernorm.weight, model.cast.layernorm.weight, atol=0, rtol=0)
