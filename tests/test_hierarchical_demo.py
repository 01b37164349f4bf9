"""The CPU-scale comparison of examples/hierarchical_shapes.py (H-CAST vs CAST with heads on the final CLS vs
Hier-ViT), run with a tiny setting: three models trained the same way, scored on the same test images."""

import json

import pytest
import torch

from hf_hierseg.apps.hierarchical_demo import (
    MODELS,
    HierarchicalDemoSettings,
    ViTForHierarchicalImageClassification,
    hier_vit,
    run_demo,
    shapes_taxonomy,
)
from hf_hierseg.convert import read_taxonomy
from hf_hierseg.evaluation.synthetic import CLASS_NAMES

from cast_testing import CONFIG_DEFAULT, CastModelTester


TINY = dict(
    num_train_images=24,
    num_test_images=12,
    image_size=32,
    hidden_size=24,
    num_clusters=(16, 8, 4, 2),
    num_superpixels=800,
    vit_patch_size=8,
    train_steps=2,
    batch_size=4,
    warmup_steps=1,
    dataloader_num_workers=0,
    eval_batch_size=12,
)


def test_taxonomy_of_the_shapes(tmp_path):
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(shapes_taxonomy()))
    taxonomy = read_taxonomy(path)
    assert taxonomy["hierarchy_num_labels"] == (6, 3)
    families = dict(zip(CLASS_NAMES, taxonomy["hierarchy_parents"][0]))
    assert families["mushroom"] == families["snowman"] and families["dumbbell"] == families["hammer"]
    assert len(set(taxonomy["hierarchy_parents"][0])) == 3


def test_hier_vit_reads_every_level_from_its_final_cls():
    taxonomy = dict(hierarchy_num_labels=(6, 3), hierarchy_parents=((1, 0, 0, 1, 2, 2),))
    cast = CastModelTester(image_size=32).get_config(num_labels=CONFIG_DEFAULT, **taxonomy)
    model = hier_vit(HierarchicalDemoSettings(**TINY), cast).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[0, 1], [4, 2]])
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, superpixels=torch.zeros(2, 32, 32, dtype=torch.long), labels=labels)
        cls_token = model.vit(pixel_values=pixel_values).last_hidden_state[:, 0]
    for head, logits in zip(model.classifier, outputs.logits_per_level, strict=True):
        torch.testing.assert_close(logits, head(cls_token), atol=0, rtol=0)
    assert outputs.loss.dim() == 0 and model.config.num_hidden_layers == 4 and model.config.patch_size == 8


@pytest.mark.slow
def test_three_models_trained_alike_and_scored_on_the_same_images(tmp_path):
    results = run_demo(tmp_path, HierarchicalDemoSettings(**TINY))
    assert list(results["scores"]) == list(MODELS)
    for name, scores in results["scores"].items():
        assert scores["num_samples"] == 12, name
        levels = scores["top1_accuracy_per_level"]
        assert len(levels) == 2 and all(0.0 <= value <= 1.0 for value in levels)
        assert scores["full_path_accuracy"] <= min(levels) + 1e-9
        assert scores["tice"] == pytest.approx(1.0 - scores["tree_consistency"])
    from hf_hierseg import CastForHierarchicalImageClassification

    hcast = CastForHierarchicalImageClassification.from_pretrained(tmp_path / "hcast")
    flat = CastForHierarchicalImageClassification.from_pretrained(tmp_path / "cast_flat")
    assert hcast.config.hierarchy_cast_levels == (3, 4) and flat.config.hierarchy_cast_levels == (4, 4)
    assert ViTForHierarchicalImageClassification.from_pretrained(tmp_path / "hier_vit").config.patch_size == 8
    # Same steps, same data order: every run saw the same samples.
    folders = ("hcast", "cast_flat", "hier_vit")
    summaries = [json.loads((tmp_path / folder / "train_summary_rank0.json").read_text()) for folder in folders]
    assert len({json.dumps(summary["data_position"]) for summary in summaries}) == 1
    report = (tmp_path / "results.md").read_text()
    for name in MODELS:
        assert f"| {name} | 12 |" in report
