"""Pipelines with the package installed: image-classification, image-feature-extraction, image-segmentation (hierarchy
level or segmentation head) and hierarchical-segmentation; paths, PIL images, lists, batch_size; `pipeline(task,
model=folder)` on saved folders without trust_remote_code and without reading stdin."""

import builtins
import io
import json
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ImageSegmentationPipeline, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from hf_hierseg import CastForImageClassification, CastForSemanticSegmentation, CastModel
from hf_hierseg.hierarchy import paint_hierarchy
from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.pipelines import (
    CastImageSegmentationPipeline,
    HierarchicalSegmentationPipeline,
    LazyMask,
    whole_image_size,
)
from hf_hierseg.segment_ops import resize_label_maps

from cast_testing import CastModelTester, smooth_photo


# mask_padding_tokens: an image's result must not depend on its batch partners (batch_size tests).
TESTER = CastModelTester(mask_padding_tokens=True)


@pytest.fixture(scope="module")
def classifier():
    labels = {0: "red", 1: "green", 2: "blue"}
    return TESTER.create_model(CastForImageClassification, num_labels=3, id2label=labels)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    pictures = [smooth_photo(80, 60, 0), smooth_photo(64, 64, 1), smooth_photo(50, 70, 2)]
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
    processor = TESTER.get_image_processor()
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
    processor = TESTER.get_image_processor()
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
    processor = TESTER.get_image_processor()
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
    segmenter = HierarchicalSegmentationPipeline(model=classifier, image_processor=TESTER.get_image_processor())
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
        image_processor=TESTER.get_image_processor(),
        pipeline_class=CastImageSegmentationPipeline,
    )
    pictures, paths = images
    levels = HierarchicalSegmentationPipeline(model=classifier, image_processor=TESTER.get_image_processor())(paths[2])
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

    names = {0: "sky", 1: "grass", 2: "road", 3: "car"}
    model = TESTER.create_model(CastForSemanticSegmentation, num_labels=4, id2label=names)
    processor = TESTER.get_image_processor()
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
            image_processor=TESTER.get_image_processor(),
        )


# -- pipeline(task, model=folder): no trust_remote_code, no prompt -----------------------------------------------------


class NoStdin(io.TextIOBase):
    def read(self, *args):
        raise AssertionError("stdin was read")

    readline = read


@pytest.fixture
def no_stdin(monkeypatch):
    """Fail on any prompt: `input()` is recorded and raises, stdin raises when read."""
    prompts = []

    def refuse(prompt=""):
        prompts.append(prompt)
        raise AssertionError(f"input() was called: {prompt!r}")

    monkeypatch.setattr(builtins, "input", refuse)
    monkeypatch.setattr(sys, "stdin", NoStdin())
    yield prompts
    assert prompts == []


@pytest.fixture(scope="module")
def saved_folders(classifier, tmp_path_factory):
    """A classifier folder (centre-cropping processor) and a segmentation-model folder (processor without centre
    crop, as the segmentation trainer and the converter save it), plain `save_pretrained`."""
    folders = tmp_path_factory.mktemp("folders")
    classifier.save_pretrained(folders / "classifier")
    TESTER.get_image_processor().save_pretrained(folders / "classifier")
    names = {0: "sky", 1: "grass", 2: "road", 3: "car"}
    segmenter = TESTER.create_model(CastForSemanticSegmentation, seed=1, num_labels=4, id2label=names)
    segmenter.save_pretrained(folders / "segmenter")
    TESTER.get_image_processor(do_center_crop=False).save_pretrained(folders / "segmenter")
    return {"classifier": folders / "classifier", "segmenter": folders / "segmenter"}


def test_saved_folders_have_no_custom_pipelines(saved_folders):
    for folder in saved_folders.values():
        assert "custom_pipelines" not in json.loads((folder / "config.json").read_text())


def test_importing_the_package_keeps_transformers_tasks():
    own = PIPELINE_REGISTRY.supported_tasks["image-segmentation"]["impl"]  # a class or its dotted name (lazy)
    assert own in (ImageSegmentationPipeline, f"{ImageSegmentationPipeline.__module__}.ImageSegmentationPipeline")
    assert PIPELINE_REGISTRY.supported_tasks["hierarchical-segmentation"]["impl"] is HierarchicalSegmentationPipeline


def test_four_pipelines_on_a_classifier_folder(saved_folders, classifier, images, no_stdin):
    folder = saved_folders["classifier"]
    pictures, paths = images
    processor = TESTER.get_image_processor()

    classify = pipeline("image-classification", model=str(folder))
    assert type(classify.model) is CastForImageClassification and classify.video_processor is None
    expected = pipeline("image-classification", model=classifier, image_processor=processor)(paths[0], top_k=3)
    result = classify(paths[0], top_k=3)
    assert [r["label"] for r in result] == [r["label"] for r in expected]
    assert [r["score"] for r in result] == pytest.approx([r["score"] for r in expected], abs=1e-6)

    extract = pipeline("image-feature-extraction", model=str(folder))
    assert type(extract.model) is CastModel
    expected_pooled = pipeline("image-feature-extraction", model=classifier.cast, image_processor=processor)(
        paths[1], pool=True, return_tensors=True
    )
    assert torch.equal(extract(paths[1], pool=True, return_tensors=True), expected_pooled)

    levels = pipeline("hierarchical-segmentation", model=str(folder))
    assert isinstance(levels, HierarchicalSegmentationPipeline) and type(levels.model) is CastModel
    expected_levels = HierarchicalSegmentationPipeline(model=classifier, image_processor=processor)(paths[2])
    for entry, expected_entry in zip(levels(paths[2])["levels"], expected_levels["levels"], strict=True):
        np.testing.assert_array_equal(entry["segmentation"], expected_entry["segmentation"])

    # transformers' own image-segmentation: a folder without a segmentation head gets a new (random) head, as any
    # transformers backbone checkpoint would; the segments of a level come from CastImageSegmentationPipeline.
    segment = pipeline("image-segmentation", model=str(folder))
    assert type(segment) is ImageSegmentationPipeline and type(segment.model) is CastForSemanticSegmentation
    check_partition([r["mask"] for r in segment(paths[0])], (60, 80))
    by_level = pipeline(
        "image-segmentation",
        model=CastModel.from_pretrained(folder),
        image_processor=str(folder),
        pipeline_class=CastImageSegmentationPipeline,
    )
    reference = expected_levels["levels"][1]
    assert sorted(r["label"] for r in by_level(paths[2], level=2)) == sorted(
        f"level2-{s['id']}" for s in reference["segments"]
    )


def test_four_pipelines_on_a_segmentation_folder(saved_folders, images, no_stdin):
    folder = saved_folders["segmenter"]
    pictures, paths = images
    model = CastForSemanticSegmentation.from_pretrained(folder).eval()
    processor = CastImageProcessor.from_pretrained(folder)
    assert processor.do_center_crop is False

    # transformers' ImageSegmentationPipeline with CastImageProcessor.post_process_semantic_segmentation: the masks
    # cover the whole image, and are the argmax of the logits resized (bilinear) to the image.
    segment = pipeline("image-segmentation", model=str(folder))
    assert type(segment) is ImageSegmentationPipeline and type(segment.model) is CastForSemanticSegmentation
    result = segment(pictures[0])
    check_partition([r["mask"] for r in result], (60, 80))
    with torch.no_grad():
        logits = model(**processor(images=[pictures[0]], return_tensors="pt")).logits
    expected = F.interpolate(logits, size=(60, 80), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    assert {r["label"] for r in result} == {model.config.id2label[int(c)] for c in np.unique(expected)}
    class_ids = {name: int(i) for i, name in model.config.id2label.items()}
    for r in result:
        class_id = class_ids[r["label"]]
        np.testing.assert_array_equal(np.asarray(r["mask"]) > 0, expected == class_id)

    levels = pipeline("hierarchical-segmentation", model=str(folder))(paths[2], levels=[1, 4])
    for entry in levels["levels"]:
        check_partition([s["mask"] for s in entry["segments"]], (70, 50))
    assert len(pipeline("image-classification", model=str(folder))(paths[0], top_k=4)) == 4
    assert pipeline("image-feature-extraction", model=str(folder))(paths[1], pool=True, return_tensors=True).shape == (
        1,
        24,
    )


# -- the same outputs as the previous post-processing, on real photos with the bundled model ---------------------------


def previous_hierarchical_postprocess(label_maps, size, levels):
    """The pipeline's post-processing before it ran in tensor ops (kept here as the reference): the maps resized,
    then per level `np.unique` for ids and areas, unique (segment, parent) pairs, one full-size mask per segment, and
    the bounding box `hf-hierseg segment` took from `np.nonzero`."""
    label_maps = resize_label_maps(label_maps, size).numpy()
    result = []
    for level in levels:
        segmentation = label_maps[level]
        ids, areas = np.unique(segmentation, return_counts=True)
        parents = {}
        if level < 4:
            pairs = np.unique(np.stack([segmentation.ravel(), label_maps[level + 1].ravel()], axis=1), axis=0)
            parents = {int(child): int(parent) for child, parent in pairs}
        segments = []
        for i, area in zip(ids, areas):
            rows, cols = np.nonzero(segmentation == i)
            bbox = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            mask = Image.fromarray(((segmentation == i) * 255).astype(np.uint8))
            segments.append(
                {"id": int(i), "parent": parents.get(int(i)), "area": int(area), "bbox": bbox, "mask": mask}
            )
        result.append({"level": level, "segmentation": segmentation, "segments": segments})
    return result


@pytest.fixture(scope="module")
def real_photos_and_model():
    from hf_hierseg import load_default
    from hf_hierseg.evaluation import real_photos

    try:
        photos = [photo["image"] for photo in real_photos.load_imagenet_photos()[:7]]
        photos.append(real_photos.load_voc_photo()["image"])
    except real_photos.RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable: {error}")
    # Photos smaller than the model's 160x160 input too (the resize then drops pixels), and odd sizes.
    photos += [photos[1].resize((97, 61)), photos[2].resize((1001, 333)), photos[3].resize((160, 159))]
    return photos, *load_default()


def test_hierarchical_segmentation_equals_the_previous_post_processing_on_real_photos(real_photos_and_model):
    photos, model, processor = real_photos_and_model
    segmenter = HierarchicalSegmentationPipeline(model=model, image_processor=processor)
    results = segmenter(photos, levels=[0, 1, 2, 3, 4], batch_size=4)
    lean = segmenter(photos[:4], levels=[2, 4], batch_size=4, return_masks=False)
    for start in range(0, len(photos), 4):  # the model on the same batches (batch partners matter here)
        batch = photos[start : start + 4]
        inputs = processor(batch, return_tensors="pt", **whole_image_size(processor))
        with torch.no_grad():
            outputs = model(**inputs)
        label_maps = torch.stack(outputs.hierarchy_maps(inputs["superpixels"]), dim=1)
        for index, picture in enumerate(batch):
            result = results[start + index]
            assert result["size"] == (picture.height, picture.width)
            expected = previous_hierarchical_postprocess(label_maps[index], result["size"], range(5))
            for entry, reference in zip(result["levels"], expected, strict=True):
                assert entry["level"] == reference["level"]
                assert entry["segmentation"].dtype == np.int64
                np.testing.assert_array_equal(entry["segmentation"], reference["segmentation"])
                assert len(entry["segments"]) == len(reference["segments"])
                for segment, reference_segment in zip(entry["segments"], reference["segments"]):
                    fields = ("id", "parent", "area", "bbox")
                    assert [segment[key] for key in fields] == [reference_segment[key] for key in fields]
                    assert segment["mask"].mode == "L" and segment["mask"].size == reference_segment["mask"].size
                    np.testing.assert_array_equal(np.asarray(segment["mask"]), np.asarray(reference_segment["mask"]))
                    assert (
                        segment["mask"] == reference_segment["mask"] and reference_segment["mask"] == segment["mask"]
                    )
            if start + index < len(lean):  # label maps only: the same maps and segments, no masks
                for entry, full in zip(lean[start + index]["levels"], (result["levels"][2], result["levels"][4])):
                    np.testing.assert_array_equal(entry["segmentation"], full["segmentation"])
                    assert entry["segments"] == [{k: v for k, v in s.items() if k != "mask"} for s in full["segments"]]


def test_image_segmentation_equals_the_previous_post_processing_on_real_photos(real_photos_and_model):
    photos, model, processor = real_photos_and_model
    segment = CastImageSegmentationPipeline(model=model, image_processor=processor)
    photos = photos[6:10]
    results = segment(photos, level=2, batch_size=4)
    inputs = processor(photos, return_tensors="pt", **whole_image_size(processor))
    with torch.no_grad():
        outputs = model(**inputs)
    level_maps = outputs.hierarchy_maps(inputs["superpixels"])[2]
    for picture, result, label_map in zip(photos, results, level_maps, strict=True):
        segmentation = resize_label_maps(label_map, (picture.height, picture.width)).numpy()
        ids = np.unique(segmentation)
        assert [r["label"] for r in result] == [f"level2-{i}" for i in ids]
        for r, i in zip(result, ids):
            np.testing.assert_array_equal(np.asarray(r["mask"]), (segmentation == i) * 255)


def test_lazy_masks_are_pil_images_computed_once():
    segmentation = np.array([[0, 0, 3], [3, 3, 0]])
    mask = LazyMask(segmentation, 3)
    assert isinstance(mask, Image.Image) and mask.mode == "L" and mask.size == (3, 2)
    assert mask.__dict__.get("_im") is None  # nothing computed yet
    expected = np.array([[0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(mask), expected)
    computed = mask.im
    assert mask.im is computed and mask.getpixel((2, 0)) == 255
    assert mask == Image.fromarray(expected) and mask != Image.fromarray(255 - expected)
    assert mask.resize((6, 4), Image.NEAREST).size == (6, 4)
    buffer = io.BytesIO()
    LazyMask(segmentation, 0).save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(buffer)), 255 - expected)
    restored = pickle.loads(pickle.dumps(LazyMask(segmentation, 3)))
    np.testing.assert_array_equal(np.asarray(restored), expected)
    assert LazyMask(segmentation, 3).copy() == mask


def test_batches_from_a_generator_come_back_in_order(classifier, images):
    segmenter = HierarchicalSegmentationPipeline(model=classifier, image_processor=TESTER.get_image_processor())
    pictures, paths = images
    listed = segmenter(paths * 2, levels=[1], batch_size=2)
    streamed = list(segmenter((path for path in paths * 2), levels=[1], batch_size=2))
    assert len(streamed) == len(listed) == 6
    for one, other in zip(listed, streamed):
        assert one["size"] == other["size"]
        np.testing.assert_array_equal(one["levels"][0]["segmentation"], other["levels"][0]["segmentation"])
