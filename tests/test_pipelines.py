"""Pipelines with the package installed: image-classification, image-feature-extraction, image-segmentation (hierarchy
level or segmentation head) and hierarchical-segmentation; paths, PIL images, lists, batch_size."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from hf_hierseg import CastConfig, CastForImageClassification
from hf_hierseg.hierarchy import paint_hierarchy
from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.pipelines import CastImageSegmentationPipeline, HierarchicalSegmentationPipeline, register_pipelines


register_pipelines()  # until hf_hierseg/__init__.py does it


def tiny_config(**kwargs):
    # mask_padding_tokens: an image's result must not depend on its batch partners (batch_size tests).
    return CastConfig(
        hidden_size=24,
        num_attention_heads=4,
        depths=(1, 1, 1, 1),
        num_clusters=(16, 8, 4, 2),
        image_size=64,
        mask_padding_tokens=True,
        **kwargs,
    )


def tiny_processor():
    return CastImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})


def photo(width, height, seed):
    """Smooth random colours (SEEDS has edges to follow)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    labels = {0: "red", 1: "green", 2: "blue"}
    return CastForImageClassification(tiny_config(num_labels=3, id2label=labels)).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    pictures = [photo(80, 60, 0), photo(64, 64, 1), photo(50, 70, 2)]
    paths = []
    for index, picture in enumerate(pictures):
        paths.append(str(folder / f"photo{index}.png"))
        picture.save(paths[-1])
    return pictures, paths


def resize_nearest(label_map, height, width):
    """Pixel-centre nearest resize: output pixel (r, c) takes input pixel (floor((r + .5) H / height), ...)."""
    rows = np.minimum(((np.arange(height) + 0.5) * label_map.shape[0] / height).astype(int), label_map.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * label_map.shape[1] / width).astype(int), label_map.shape[1] - 1)
    return label_map[rows][:, cols]


def direct_outputs(model, processor, picture, **processor_kwargs):
    inputs = processor(images=[picture], return_tensors="pt", **processor_kwargs)
    with torch.no_grad():
        return model(**inputs), inputs["superpixels"]


def test_image_classification_matches_the_model_for_every_input_form(classifier, images):
    processor = tiny_processor()
    classify = pipeline("image-classification", model=classifier, image_processor=processor)
    pictures, paths = images
    outputs, _ = direct_outputs(classifier, processor, pictures[0])
    probabilities = outputs.logits.softmax(-1)[0]
    expected = {classifier.config.id2label[i]: p.item() for i, p in enumerate(probabilities)}

    for result in (classify(pictures[0], top_k=3), classify(paths[0], top_k=3)):
        assert {r["label"] for r in result} == set(expected)
        for r in result:
            assert r["score"] == pytest.approx(expected[r["label"]], abs=1e-5)
    single = [classify(path, top_k=3) for path in paths]
    batched = classify(paths, top_k=3, batch_size=3)
    for one, many in zip(single, batched):
        assert [r["label"] for r in one] == [r["label"] for r in many]
        assert [r["score"] for r in one] == pytest.approx([r["score"] for r in many], abs=1e-5)


def test_image_feature_extraction_pooled_and_per_token(classifier, images):
    processor = tiny_processor()
    extract = pipeline("image-feature-extraction", model=classifier.cast, image_processor=processor)
    pictures, paths = images
    outputs, _ = direct_outputs(classifier.cast, processor, pictures[1])
    pooled = extract(paths[1], pool=True, return_tensors=True)
    tokens = extract(pictures[1], return_tensors=True)
    torch.testing.assert_close(pooled, outputs.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, outputs.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert tokens.shape == (1, 1 + 4, 24)  # CLS + the 4 level-4 tokens
    assert len(extract(paths, pool=True, batch_size=2)) == 3


def check_partition(masks, size):
    stacked = np.stack([np.asarray(mask) > 0 for mask in masks])
    assert stacked.shape[1:] == size
    assert (stacked.sum(0) == 1).all(), "masks must cover every pixel exactly once"


def test_hierarchical_segmentation_levels_masks_and_parent_links(classifier, images):
    processor = tiny_processor()
    segmenter = pipeline("hierarchical-segmentation", model=classifier, image_processor=processor)
    assert isinstance(segmenter, HierarchicalSegmentationPipeline)
    pictures, paths = images
    result = segmenter(pictures[0], overlay=True)
    height, width = pictures[0].height, pictures[0].width
    assert result["size"] == (height, width) and [entry["level"] for entry in result["levels"]] == [1, 2, 3, 4]

    # Independently: the model on the whole picture (no centre crop), its hierarchy painted and resized.
    outputs, superpixels = direct_outputs(
        classifier, processor, pictures[0], do_center_crop=False, size={"height": 64, "width": 64}
    )
    painted = paint_hierarchy(outputs.hierarchy, superpixels)
    for entry in result["levels"]:
        level = entry["level"]
        expected = resize_nearest(painted[level][0].numpy(), height, width)
        np.testing.assert_array_equal(entry["segmentation"], expected)
        check_partition([segment["mask"] for segment in entry["segments"]], (height, width))
        assert len(entry["segments"]) <= classifier.config.num_clusters[level - 1]
        assert entry["overlay"].size == (width, height) and entry["overlay"].mode == "RGB"
        for segment in entry["segments"]:
            inside = entry["segmentation"] == segment["id"]
            assert segment["area"] == inside.sum()
            if level == 4:
                assert segment["parent"] is None
            else:  # the whole segment lies inside its parent at the next level
                next_level = result["levels"][level]["segmentation"]
                assert (next_level[inside] == segment["parent"]).all()


def test_hierarchical_segmentation_inputs_levels_and_batches(classifier, images):
    segmenter = HierarchicalSegmentationPipeline(model=classifier, image_processor=tiny_processor())
    pictures, paths = images
    single = [segmenter(path, levels=[0, 2]) for path in paths]
    batched = segmenter(pictures, levels=[2, 0], batch_size=2)
    assert len(batched) == 3
    for one, many, picture in zip(single, batched, pictures):
        assert [entry["level"] for entry in many["levels"]] == [0, 2]
        assert "overlay" not in many["levels"][0]
        assert many["size"] == (picture.height, picture.width)
        for a, b in zip(one["levels"], many["levels"]):
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    with pytest.raises(ValueError, match="levels"):
        segmenter(paths[0], levels=[5])


def test_image_segmentation_from_a_hierarchy_level(classifier, images):
    segment = pipeline(
        "image-segmentation",
        model=classifier,
        image_processor=tiny_processor(),
        pipeline_class=CastImageSegmentationPipeline,
    )
    pictures, paths = images
    levels = HierarchicalSegmentationPipeline(model=classifier, image_processor=tiny_processor())(paths[2])
    for level in (2, 3):
        result = segment(paths[2], level=level)
        check_partition([r["mask"] for r in result], (70, 50))
        reference = levels["levels"][level - 1]
        assert sorted(r["label"] for r in result) == sorted(f"level{level}-{s['id']}" for s in reference["segments"])
        assert all(r["score"] is None for r in result)
    assert len(segment(paths, batch_size=3)) == 3
    with pytest.raises(ValueError, match="semantic"):
        segment(paths[0], subtask="panoptic")


def test_image_segmentation_with_the_segmentation_head(images):
    from hf_hierseg.modeling_cast import CastForSemanticSegmentation

    torch.manual_seed(0)
    names = {0: "sky", 1: "grass", 2: "road", 3: "car"}
    model = CastForSemanticSegmentation(tiny_config(num_labels=4, id2label=names)).eval()
    processor = tiny_processor()
    segment = CastImageSegmentationPipeline(model=model, image_processor=processor)
    pictures, paths = images
    result = segment(pictures[0])
    check_partition([r["mask"] for r in result], (60, 80))
    outputs, _ = direct_outputs(model, processor, pictures[0], do_center_crop=False, size={"height": 64, "width": 64})
    expected = resize_nearest(outputs.logits.argmax(1)[0].numpy(), 60, 80)
    by_label = {r["label"]: np.asarray(r["mask"]) > 0 for r in result}
    assert set(by_label) == {names[c] for c in np.unique(expected)}
    for label, mask in by_label.items():
        class_id = next(k for k, v in names.items() if v == label)
        np.testing.assert_array_equal(mask, expected == class_id)


def test_pipelines_refuse_other_models():
    from transformers import ViTConfig, ViTModel

    with pytest.raises(ValueError, match="CAST"):
        HierarchicalSegmentationPipeline(
            model=ViTModel(ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=8)),
            image_processor=tiny_processor(),
        )
