"""Open-vocabulary objects and parts: the `zero-shot-hierarchical-segmentation` pipeline (a tiny CAST and a tiny random
CLIP whose tokenizer reads a hand-written vocab.json / merges.txt), the segment views and their batching, and the
PartImageNet-protocol evaluation on a hand-made two-image COCO set whose scores are computed by hand below."""

import json
import math
import os
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_sam_masks import save_tiny_sam
from transformers import (
    CLIPImageProcessorPil,
    CLIPTokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    pipeline,
)

from hf_hierseg import CastModel
from hf_hierseg.evaluation import metrics
from hf_hierseg.evaluation.open_vocabulary import (
    CocoPartDataset,
    MaskPartDataset,
    OpenVocabularyLabeler,
    PartTaxonomy,
    SamSegments,
    Segments,
    consecutive_ids,
    decode_compressed_rle,
    evaluate_open_vocabulary,
    format_open_vocabulary_report,
    paper_image_view,
    paper_label_view,
    polygons_mask,
    rle_mask,
    run_open_vocabulary_evaluation,
)
from hf_hierseg.evaluation.tiny_clip import tiny_random_clip, write_tiny_clip_vocabulary
from hf_hierseg.hub import add_remote_code
from hf_hierseg.pipelines import ZeroShotHierarchicalSegmentationPipeline
from hf_hierseg.segment_labeling import (
    BACKGROUND_LABEL,
    encode_segments,
    encode_texts,
    gaussian_blur,
    label_segments,
    match_texts,
    paint_masks,
    part_vocabulary,
    resize_masks,
    segment_masks,
    segment_views,
)

from cast_testing import CastModelTester, smooth_photo


REPO_ROOT = Path(__file__).resolve().parents[1]
OBJECTS = ["cat", "dog", "car", "bird", "boat"]
PARTS = {
    "cat": ["cat head", "cat body", "cat tail"],
    "dog": ["dog head", "dog body"],
    "car": ["car wheel", "car body"],
}


TESTER = CastModelTester(mask_padding_tokens=True)  # an image's result must not depend on its batch partners


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The tiny CLIP and its processor; its tokenizer is a CLIPTokenizer read from hand-written vocabulary files."""
    folder = tmp_path_factory.mktemp("clip_vocabulary")
    model, processor = tiny_random_clip(image_size=32, vocabulary_folder=folder)
    vocabulary = json.loads((folder / "vocab.json").read_text())
    assert isinstance(processor.tokenizer, CLIPTokenizer) and len(processor.tokenizer) == len(vocabulary)
    assert "photo</w>" in vocabulary and (folder / "merges.txt").read_text().startswith("#version")
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("a photo of a cat head")["input_ids"])
    assert tokens[:5] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>"]
    return model, processor


@pytest.fixture(scope="module")
def segmenter(clip):
    model, processor = clip
    return pipeline(
        "zero-shot-hierarchical-segmentation",
        model=TESTER.create_model(CastModel),
        image_processor=TESTER.get_image_processor(),
        clip_model=model,
        clip_processor=processor,
    )


@pytest.fixture(scope="module")
def pictures():
    return [smooth_photo(80, 60, 0), smooth_photo(64, 64, 1), smooth_photo(50, 70, 2)]


def check_level(entry, level, names, size):
    assert set(entry) == {"level", "labels", "label_map", "segmentation", "segments"}
    assert entry["level"] == level and entry["labels"] == names and entry["labels"][-1] == BACKGROUND_LABEL
    label_map, segmentation = entry["label_map"], entry["segmentation"]
    assert isinstance(label_map, np.ndarray) and label_map.dtype == np.int64 and label_map.shape == size
    assert segmentation.dtype == np.int64 and segmentation.shape == size
    assert [segment["id"] for segment in entry["segments"]] == np.unique(segmentation).tolist()
    for segment in entry["segments"]:
        assert set(segment) == {"id", "label", "score"} and isinstance(segment["score"], float)
        assert 0.0 < segment["score"] <= 1.0 and segment["label"] in names
        # every pixel of a segment has the segment's label
        assert (label_map[segmentation == segment["id"]] == names.index(segment["label"])).all()
    assert set(np.unique(label_map)) <= set(range(len(names)))


def test_pipeline_objects_and_parts_structure(segmenter, pictures):
    assert isinstance(segmenter, ZeroShotHierarchicalSegmentationPipeline)
    picture = pictures[0]
    result = segmenter(picture, candidate_labels=OBJECTS, part_labels=PARTS)
    assert set(result) == {"objects", "parts"}
    size = (picture.height, picture.width)
    check_level(result["objects"], 4, OBJECTS + [BACKGROUND_LABEL], size)
    part_names = ["cat head", "cat body", "cat tail", "dog head", "dog body", "car wheel", "car body", "bird", "boat"]
    check_level(result["parts"], 3, part_names + [BACKGROUND_LABEL], size)
    # The segments are CAST's: those of the hierarchical-segmentation pipeline at the same levels.
    hierarchy = pipeline("hierarchical-segmentation", model=segmenter.model, image_processor=segmenter.image_processor)
    levels = {entry["level"]: entry["segmentation"] for entry in hierarchy(picture, levels=(3, 4))["levels"]}
    np.testing.assert_array_equal(result["objects"]["segmentation"], levels[4])
    np.testing.assert_array_equal(result["parts"]["segmentation"], levels[3])
    assert set(segmenter(picture, candidate_labels=OBJECTS)) == {"objects"}  # parts only with part labels
    other = segmenter(picture, candidate_labels=OBJECTS, part_labels=PARTS, object_level=3, part_level=2)
    assert other["objects"]["level"] == 3 and other["parts"]["level"] == 2
    np.testing.assert_array_equal(other["objects"]["segmentation"], levels[3])


def parts_follow_objects(result, parts_of):
    """Every pixel's part label is a part of the object label under it; background stays background."""
    objects, parts = result["objects"], result["parts"]
    object_names, part_names = objects["labels"], parts["labels"]
    for object_index, name in enumerate(object_names):
        under = parts["label_map"][objects["label_map"] == object_index]
        allowed = [part_names.index(BACKGROUND_LABEL)] if name == BACKGROUND_LABEL else parts_of[name]
        assert set(np.unique(under)) <= set(allowed), (name, np.unique(under), allowed)


@pytest.mark.parametrize("flat", [False, True])
def test_part_labels_follow_the_object_labels(segmenter, pictures, flat):
    part_labels = [part for parts in PARTS.values() for part in parts] if flat else PARTS
    names, parts_of = part_vocabulary(OBJECTS, part_labels)
    parts_of = dict(zip(OBJECTS, parts_of))
    labelled_objects = set()
    for picture in pictures:
        result = segmenter(picture, candidate_labels=OBJECTS, part_labels=part_labels)
        assert result["parts"]["labels"] == names + [BACKGROUND_LABEL]
        parts_follow_objects(result, parts_of)
        labelled_objects |= {segment["label"] for segment in result["objects"]["segments"]}
    assert labelled_objects - {BACKGROUND_LABEL}, "the check needs objects that are not background"


def test_batching_equals_one_at_a_time(segmenter, pictures):
    kwargs = {"candidate_labels": OBJECTS, "part_labels": PARTS}
    one_by_one = [segmenter(picture, segment_batch_size=1, **kwargs) for picture in pictures]
    batched = segmenter(pictures, segment_batch_size=64, batch_size=3, **kwargs)
    for single, many in zip(one_by_one, batched):
        for key in ("objects", "parts"):
            np.testing.assert_array_equal(single[key]["label_map"], many[key]["label_map"])
            assert [s["label"] for s in single[key]["segments"]] == [s["label"] for s in many[key]["segments"]]
            assert [s["score"] for s in single[key]["segments"]] == pytest.approx(
                [s["score"] for s in many[key]["segments"]], abs=1e-5
            )


def test_segments_are_encoded_in_batches(clip, monkeypatch):
    model, _ = clip
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 32, 32, generator=generator) for _ in range(2)]
    masks = [segment_masks(torch.randint(0, 5, (16, 16), generator=generator))[1] for _ in range(2)]
    counts = [len(image_masks) for image_masks in masks]
    expected = encode_segments(model, images, masks, segment_batch_size=1)
    calls = []
    original = model.get_image_features

    def counting(pixel_values, **kwargs):
        calls.append(len(pixel_values))
        return original(pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(model, "get_image_features", counting)
    for batch_size in (3, 7, 100):
        calls.clear()
        embeddings = encode_segments(model, images, masks, segment_batch_size=batch_size)
        total = sum(counts)
        assert calls == [batch_size] * (total // batch_size) + ([total % batch_size] if total % batch_size else [])
        for got, want in zip(embeddings, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert [len(e) for e in embeddings] == counts


def tiny_siglip(tokenizer):
    """A tiny random SigLIP reading the tiny CLIP tokenizer's ids (SigLIP's own tokenizer needs a SentencePiece
    model); its logit scale and bias are set away from their zero initialisation."""
    torch.manual_seed(1)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    config = SiglipConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 64, **layers, **special},
        vision_config={"image_size": 32, "patch_size": 8, **layers},
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scores_are_the_models_own_probabilities(clip, kind):
    """Labels and scores agree with the model's own forward on the segment views: CLIP's softmax over the texts of
    `logits_per_image`, SigLIP's sigmoid of each."""
    tokenizer = clip[1].tokenizer
    model = clip[0] if kind == "clip" else tiny_siglip(tokenizer)
    names = ["cat", "dog", "car", BACKGROUND_LABEL]
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(3, 32, 32, generator=generator)
    masks = segment_masks(
        torch.randint(0, 4, (8, 8), generator=generator).repeat_interleave(4, 0).repeat_interleave(4, 1)
    )[1]
    labels, scores = match_texts(
        model, encode_segments(model, [image], [masks])[0], encode_texts(model, tokenizer, names)
    )
    padding = {"padding": "max_length", "max_length": 64} if kind == "siglip" else {"padding": True}
    tokens = tokenizer([f"a photo of a {name}" for name in names], return_tensors="pt", **padding)
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], pixel_values=segment_views(image, masks)).logits_per_image
    probabilities = logits.sigmoid() if kind == "siglip" else logits.softmax(dim=-1)
    assert torch.equal(labels, logits.argmax(dim=-1))
    torch.testing.assert_close(scores, probabilities.gather(1, labels[:, None])[:, 0], atol=1e-5, rtol=1e-5)


def test_pipeline_with_siglip(clip, pictures):
    tokenizer = clip[1].tokenizer
    processor = types.SimpleNamespace(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    segment = pipeline(
        "zero-shot-hierarchical-segmentation",
        model=TESTER.create_model(CastModel),
        image_processor=TESTER.get_image_processor(),
        clip_model=tiny_siglip(tokenizer),
        clip_processor=processor,
    )
    result = segment(pictures[2], candidate_labels=OBJECTS, part_labels=PARTS)
    size = (pictures[2].height, pictures[2].width)
    check_level(result["objects"], 4, OBJECTS + [BACKGROUND_LABEL], size)
    names, parts_of = part_vocabulary(OBJECTS, PARTS)
    check_level(result["parts"], 3, names + [BACKGROUND_LABEL], size)
    parts_follow_objects(result, dict(zip(OBJECTS, parts_of)))


def test_masking_variants():
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(3, 20, 24, generator=generator)
    masks = torch.zeros(2, 20, 24, dtype=torch.bool)
    masks[0, 2:9, 3:15] = True
    masks[1, 10:, :] = True
    fill = segment_views(image, masks, "fill", fill_value=0.5)  # the authors': 0.5 after CLIP's normalisation
    for view, mask in zip(fill, masks):
        assert torch.equal(view[:, mask], image[:, mask]) and (view[:, ~mask] == 0.5).all()
    blurred = gaussian_blur(image, 2.0)
    blur = segment_views(image, masks, "blur", blur_sigma=2.0)
    for view, mask in zip(blur, masks):
        assert torch.equal(view[:, mask], image[:, mask]) and torch.equal(view[:, ~mask], blurred[:, ~mask])
    assert not torch.allclose(blurred, image) and blurred.std() < image.std()
    torch.testing.assert_close(gaussian_blur(torch.full((3, 9, 9), 0.3), 3.0), torch.full((3, 9, 9), 0.3))
    crop = segment_views(image, masks, "crop")
    box = image[None, :, 2:9, 3:15]
    torch.testing.assert_close(crop[0], F.interpolate(box, size=(20, 24), mode="bicubic", align_corners=False)[0])
    whole = segment_views(image, torch.ones(1, 20, 24, dtype=torch.bool), "crop")[0]
    torch.testing.assert_close(whole, image, atol=1e-5, rtol=1e-5)  # the whole image as its own box
    with pytest.raises(ValueError, match="masking"):
        segment_views(image, masks, "paint")


def test_pipeline_masking_options_change_what_clip_sees(segmenter, pictures):
    scores = {}
    for masking in ("fill", "crop", "blur"):
        result = segmenter(pictures[0], candidate_labels=OBJECTS, masking=masking)
        scores[masking] = [segment["score"] for segment in result["objects"]["segments"]]
    assert scores["fill"] != scores["crop"] and scores["fill"] != scores["blur"]


def test_resize_masks_keeps_small_segments():
    label_map = torch.zeros(32, 32, dtype=torch.long)
    label_map[5, 6] = 1  # one pixel: nearest downsampling to 8 x 8 misses it
    _, masks = segment_masks(label_map)
    resized = resize_masks(masks, (8, 8))
    assert resized[1].sum() == 1 and resized[1][1, 1]  # the pixel its area overlaps
    assert resized[0].all()


def test_part_vocabulary_rules():
    names, parts_of = part_vocabulary(["Quadruped", "Bird", "Boat"], ["Quadruped Head", "Bird Wing", "Quadruped Tail"])
    assert names == ["Quadruped Head", "Quadruped Tail", "Bird Wing", "Boat"]  # Boat keeps its own name
    assert parts_of == [[0, 1], [2], [3]]
    names, parts_of = part_vocabulary(["a", "b"], {"b": ["wheel", "seat"]})
    assert names == ["a", "wheel", "seat"] and parts_of == [[0], [1, 2]]
    with pytest.raises(ValueError, match="contain no object name"):
        part_vocabulary(["cat"], ["wheel"])
    with pytest.raises(ValueError, match="not candidate labels"):
        part_vocabulary(["cat"], {"dog": ["head"]})


def test_pipeline_errors(segmenter, clip, pictures):
    with pytest.raises(ValueError, match="candidate_labels"):
        segmenter(pictures[0])
    with pytest.raises(ValueError, match="Background"):
        segmenter(pictures[0], candidate_labels=["cat", "background"])
    with pytest.raises(ValueError, match="part_level"):
        segmenter(pictures[0], candidate_labels=["cat"], part_labels=["cat head"], object_level=2, part_level=3)
    with pytest.raises(ValueError, match="masking"):
        segmenter(pictures[0], candidate_labels=["cat"], masking="paint")
    with pytest.raises(ValueError, match="segment_batch_size"):
        segmenter(pictures[0], candidate_labels=["cat"], segment_batch_size=0)
    with pytest.raises(ValueError, match="Unknown arguments"):
        segmenter(pictures[0], candidate_labels=["cat"], colour="red")
    with pytest.raises(ValueError, match="clip_model"):
        pipeline(
            "zero-shot-hierarchical-segmentation",
            model=TESTER.create_model(CastModel),
            image_processor=TESTER.get_image_processor(),
        )
    with pytest.raises(TypeError, match="CLIP-style"):
        ZeroShotHierarchicalSegmentationPipeline(
            model=TESTER.create_model(CastModel),
            image_processor=TESTER.get_image_processor(),
            clip_model=TESTER.create_model(CastModel),
        )
    with pytest.raises(ValueError, match="CAST"):
        ZeroShotHierarchicalSegmentationPipeline(
            model=clip[0], image_processor=TESTER.get_image_processor(), clip_model=clip[0]
        )


def test_pipeline_loads_both_models_from_folders(tmp_path, clip, pictures, segmenter):
    model, processor = clip
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    segmenter.model.save_pretrained(tmp_path / "cast")
    segmenter.image_processor.save_pretrained(tmp_path / "cast")
    loaded = pipeline(
        "zero-shot-hierarchical-segmentation", model=str(tmp_path / "cast"), clip_model=str(tmp_path / "clip")
    )
    kwargs = {"candidate_labels": OBJECTS, "part_labels": PARTS}
    expected, result = segmenter(pictures[1], **kwargs), loaded(pictures[1], **kwargs)
    for key in ("objects", "parts"):
        np.testing.assert_array_equal(result[key]["label_map"], expected[key]["label_map"])


# Runs in `python -I` with `hf_hierseg` blocked: the pipeline from a shared CAST folder, CLIP from its folder.
CHILD = r"""
import importlib.abc, json, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_hierseg" or name.startswith("hf_hierseg."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, BlockPackage())
import numpy as np
from PIL import Image
from transformers import pipeline

spec = json.loads(sys.argv[1])
runner = pipeline("zero-shot-hierarchical-segmentation", model=spec["cast"], trust_remote_code=True,
                  clip_model=spec["clip"])
result = runner(Image.open(spec["image"]), candidate_labels=spec["objects"], part_labels=spec["parts"])
np.savez(spec["output"], **{key: result[key]["label_map"] for key in result})
print(json.dumps({"class": type(runner).__module__ + "." + type(runner).__name__,
                  **{key: result[key]["segments"] for key in result}}))
"""


@pytest.mark.slow
def test_remote_code_without_the_package(tmp_path, clip, segmenter, pictures):
    model, processor = clip
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    segmenter.model.save_pretrained(tmp_path / "cast")
    segmenter.image_processor.save_pretrained(tmp_path / "cast")
    add_remote_code(tmp_path / "cast")
    config = json.loads((tmp_path / "cast" / "config.json").read_text())
    assert config["custom_pipelines"]["zero-shot-hierarchical-segmentation"]["impl"] == (
        "pipelines.ZeroShotHierarchicalSegmentationPipeline"
    )
    assert (tmp_path / "cast" / "segment_labeling.py").is_file()
    pictures[0].save(tmp_path / "photo.png")
    spec = {
        "cast": str(tmp_path / "cast"),
        "clip": str(tmp_path / "clip"),
        "image": str(tmp_path / "photo.png"),
        "objects": OBJECTS,
        "parts": PARTS,
        "output": str(tmp_path / "maps.npz"),
    }
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    child = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**environment, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.")
    assert report["class"].endswith(".pipelines.ZeroShotHierarchicalSegmentationPipeline")
    expected = segmenter(Image.open(tmp_path / "photo.png"), candidate_labels=OBJECTS, part_labels=PARTS)
    maps = np.load(tmp_path / "maps.npz")
    for key in ("objects", "parts"):
        np.testing.assert_array_equal(maps[key], expected[key]["label_map"])
        assert [(s["id"], s["label"]) for s in report[key]] == [
            (s["id"], s["label"]) for s in expected[key]["segments"]
        ]


def test_real_photo_with_the_bundled_model(clip):
    from hf_hierseg import load_default
    from hf_hierseg.evaluation.real_photos import RealPhotosUnavailableError, load_voc_photo

    try:
        photo_data = load_voc_photo()
    except RealPhotosUnavailableError as error:
        pytest.skip(str(error))
    model, processor = load_default()
    clip_model, clip_processor = clip
    segment = pipeline(
        "zero-shot-hierarchical-segmentation",
        model=model,
        image_processor=processor,
        clip_model=clip_model,
        clip_processor=clip_processor,
    )
    objects = photo_data["class_names"][1:11]  # VOC's names, without "background"
    result = segment(photo_data["image"], candidate_labels=objects, part_labels=[f"{objects[0]} head"])
    size = (photo_data["image"].height, photo_data["image"].width)
    check_level(result["objects"], 4, objects + [BACKGROUND_LABEL], size)
    check_level(result["parts"], 3, [f"{objects[0]} head", *objects[1:], BACKGROUND_LABEL], size)


# --------------------------------------------------------------------------------------------------------------
# The evaluation, on a hand-made COCO set with a CLIP-style model that sees colours
# --------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "black": (0, 0, 0)}
# Text embedding of each name: the colours it is made of.
NAME_COLOURS = {
    "Cat": ("red", "green"),
    "Car": ("blue", "yellow"),
    BACKGROUND_LABEL: ("black",),
    "Cat Head": ("red",),
    "Cat Body": ("green",),
    "Car Body": ("blue",),
    "Car Tier": ("yellow",),
}


class ColourClip(torch.nn.Module):
    """A CLIP-style model with known answers: an image embedding counts the pixels of each pure colour (the 0.5 fill
    counts for none), a text embedding marks the colours of its name (`NAME_COLOURS`)."""

    config = types.SimpleNamespace(model_type="colour-clip")

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device and dtype
        self.prompts = [f"a photo of a {name}" for name in NAME_COLOURS]

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def get_image_features(self, pixel_values):
        colours = torch.tensor(list(COLOURS.values()), dtype=pixel_values.dtype)  # [5, 3]
        equal = (pixel_values[:, None] - colours[None, :, :, None, None]).abs().amax(dim=2) < 1e-6  # [B, 5, h, w]
        return equal.flatten(2).sum(2).float()

    def get_text_features(self, input_ids, attention_mask=None):
        names = list(NAME_COLOURS)
        rows = [[float(colour in NAME_COLOURS[names[int(i)]]) for colour in COLOURS] for i in input_ids[:, 0]]
        return torch.tensor(rows)

    def tokenizer(self, prompts, return_tensors="pt", **kwargs):
        return {"input_ids": torch.tensor([[self.prompts.index(prompt)] for prompt in prompts])}


def colour_processor():
    """CLIP's processor without normalisation (mean 0, std 1), so pure colours stay 0 / 1."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=[0.0] * 3, image_std=[1.0] * 3
    )


def rectangle(top, left, bottom, right):
    """A COCO polygon covering rows top..bottom-1 and columns left..right-1 (pixel centres inside)."""
    return [left, top, right, top, right, bottom, left, bottom]


def paint(image, top, left, bottom, right, colour):
    image[top:bottom, left:right] = np.array(COLOURS[colour]) * 255


def write_hand_made_set(folder):
    """Two 224 x 224 images (the paper's view leaves them as they are). Image 1: a cat (head red rows 0-55, body green
    rows 56-111, columns 0-111). Image 2 (in a PartImageNet class folder): a car (blue rows 112-223, columns 112-223)
    whose tier (yellow rows 168-223, columns 112-167, an RLE annotation after the body's polygon) covers part of its
    body, and a red blob (rows 0-111, columns 0-111) that is not annotated."""
    first, second = np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 3), np.uint8)
    paint(first, 0, 0, 56, 112, "red")
    paint(first, 56, 0, 112, 112, "green")
    paint(second, 112, 112, 224, 224, "blue")
    paint(second, 168, 112, 224, 168, "yellow")
    paint(second, 0, 0, 112, 112, "red")
    (folder / "n02123045").mkdir(parents=True)
    Image.fromarray(first).save(folder / "cat.png")
    Image.fromarray(second).save(folder / "n02123045" / "n02123045_car.png")
    tier = np.zeros((224, 224), bool)
    tier[168:224, 112:168] = True
    counts, current = [0], False  # RLE: column-major runs, alternately of zeros and ones, zeros first
    for value in tier.T.ravel():
        if value != current:
            counts.append(0)
            current = value
        counts[-1] += 1
    annotation = {
        "images": [
            {"id": 7, "file_name": "n02123045_car.png", "height": 224, "width": 224},
            {"id": 3, "file_name": "cat.png", "height": 224, "width": 224},
        ],
        "categories": [
            {"id": 1, "name": "Cat Head", "supercategory": "Cat"},
            {"id": 2, "name": "Cat Body", "supercategory": "Cat"},
            {"id": 5, "name": "Car Body", "supercategory": "Car"},
            {"id": 6, "name": "Car Tier", "supercategory": "Car"},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 1, "segmentation": [rectangle(0, 0, 56, 112)]},
            {"id": 2, "image_id": 3, "category_id": 2, "segmentation": [rectangle(56, 0, 112, 112)]},
            {"id": 3, "image_id": 7, "category_id": 5, "segmentation": [rectangle(112, 112, 224, 224)]},
            {"id": 4, "image_id": 7, "category_id": 6, "segmentation": {"size": [224, 224], "counts": counts}},
        ],
    }
    (folder / "val.json").write_text(json.dumps(annotation))
    return folder / "val.json"


def box(top, left, bottom, right, label, label_map):
    label_map[top:bottom, left:right] = label


class FixedSegments:
    """Hand-made segments per image key. Image 3 (the cat): objects = the cat square and the rest; parts = rows 0-83
    (head and the top of the body: mostly red -> Cat Head), rows 84-111 (green -> Cat Body) and the rest, with ids
    0, 1, 5 (not consecutive: the authors' loop skips the image). Image 7: objects = the car square, the red blob,
    the rest; parts = the tier, the rest of the car, the blob, the rest."""

    name = "fixed"

    def __init__(self):
        self.calls = []
        cat_objects, cat_parts = np.full((224, 224), 1), np.full((224, 224), 5)
        box(0, 0, 112, 112, 0, cat_objects)
        box(0, 0, 84, 112, 0, cat_parts)
        box(84, 0, 112, 112, 1, cat_parts)
        car_objects, car_parts = np.full((224, 224), 2), np.full((224, 224), 3)
        box(112, 112, 224, 224, 0, car_objects)
        box(0, 0, 112, 112, 1, car_objects)
        box(112, 112, 224, 224, 1, car_parts)
        box(168, 112, 224, 168, 0, car_parts)
        box(0, 0, 112, 112, 2, car_parts)
        self.maps = {"3": (cat_objects, cat_parts), "7": (car_objects, car_parts)}

    def __call__(self, views):
        self.calls.append(views.key)
        objects, parts = (torch.from_numpy(m) for m in self.maps[views.key])
        return Segments(segment_masks(objects)[1], segment_masks(parts)[1], consecutive_ids(parts))


# The scores by hand (class ids: objects Cat 0, Car 1, Background 2; parts Cat Head 0, Cat Body 1, Car Body 2, Car
# Tier 3, Background 4). Image 3, objects: Cat and Background exact -> 1. Parts: Cat Head predicted on 84 x 112 px,
# true on 56 x 112 -> 2/3; Cat Body predicted 28 x 112, true 56 x 112 -> 1/2; Background exact -> 1: (2/3 + 1/2 + 1)/3.
# Image 7, objects: Car exact -> 1; Cat (the blob, 112 x 112 px) not in the truth -> 0; Background predicted on
# 50176 - 2 x 12544 = 25088 px of the true 37632 -> 2/3: (1 + 0 + 2/3)/3. Parts: Car Body and Car Tier exact,
# Cat Head (the blob) 0, Background 2/3: (1 + 1 + 0 + 2/3)/4.
IMAGE_OBJECTS = {"3": Fraction(1), "7": (1 + Fraction(2, 3)) / 3}
IMAGE_PARTS = {"3": (Fraction(2, 3) + Fraction(1, 2) + 1) / 3, "7": (2 + Fraction(2, 3)) / 4}
# Dataset level. Objects: Cat 12544 / (12544 + 12544) = 1/2, Car 1, Background (37632 + 25088) / (2 x 37632) = 5/6.
DATASET_OBJECTS = (Fraction(1, 2) + 1 + Fraction(5, 6)) / 3
# Parts: Cat Head 6272 / (9408 + 12544) = 2/7, Cat Body 3136 / 6272 = 1/2, Car Body 1, Car Tier 1, Background 5/6.
DATASET_PARTS = (Fraction(2, 7) + Fraction(1, 2) + 1 + 1 + Fraction(5, 6)) / 5


@pytest.fixture
def hand_made(tmp_path):
    dataset = CocoPartDataset(write_hand_made_set(tmp_path / "data"), tmp_path / "data")
    clip_model = ColourClip()
    labeler = OpenVocabularyLabeler(clip_model, colour_processor(), clip_model.tokenizer, dataset.taxonomy)
    return dataset, labeler


def test_coco_ground_truth_of_the_hand_made_set(hand_made):
    dataset, _ = hand_made
    assert dataset.taxonomy == PartTaxonomy(
        ("Cat", "Car"), ("Cat Head", "Cat Body", "Car Body", "Car Tier"), (0, 0, 1, 1)
    )
    assert [dataset.key(i) for i in range(len(dataset))] == ["3", "7"]  # image id order
    cat, car = dataset[0], dataset[1]
    expected = np.full((224, 224), 4)
    box(0, 0, 56, 112, 0, expected)
    box(56, 0, 112, 112, 1, expected)
    np.testing.assert_array_equal(cat.part_map, expected)
    np.testing.assert_array_equal(cat.object_map, np.where(expected < 4, 0, 2))
    expected = np.full((224, 224), 4)
    box(112, 112, 224, 224, 2, expected)
    box(168, 112, 224, 168, 3, expected)  # the later annotation covers the body
    np.testing.assert_array_equal(car.part_map, expected)
    np.testing.assert_array_equal(car.object_map, np.where(expected < 4, 1, 2))


def test_evaluation_scores_by_hand(hand_made, tmp_path):
    dataset, labeler = hand_made
    segmenter = FixedSegments()
    summary, rows = evaluate_open_vocabulary(dataset, [segmenter], labeler, results_file=tmp_path / "rows.jsonl")
    assert [row["key"] for row in rows] == ["3", "7"] and [row["authors_keep"] for row in rows] == [False, True]
    for row in rows:
        assert row["objects"]["jaccard"] == pytest.approx(float(IMAGE_OBJECTS[row["key"]]), abs=1e-12)
        assert row["parts"]["jaccard"] == pytest.approx(float(IMAGE_PARTS[row["key"]]), abs=1e-12)
    objects, parts = summary["fixed"]["objects"], summary["fixed"]["parts"]
    assert objects["mean_per_image_jaccard"] == pytest.approx(float(sum(IMAGE_OBJECTS.values()) / 2), abs=1e-12)
    assert parts["mean_per_image_jaccard"] == pytest.approx(float(sum(IMAGE_PARTS.values()) / 2), abs=1e-12)
    assert objects["mean_iou"] == pytest.approx(float(DATASET_OBJECTS), abs=1e-12)
    assert parts["mean_iou"] == pytest.approx(float(DATASET_PARTS), abs=1e-12)
    assert objects["per_category_iou"] == pytest.approx({"Cat": 0.5, "Car": 1.0, BACKGROUND_LABEL: 5 / 6})
    assert objects["num_images"] == 2 and objects["authors_selection"]["num_images"] == 1
    assert objects["authors_selection"]["mean_per_image_jaccard"] == pytest.approx(float(IMAGE_OBJECTS["7"]))
    assert parts["authors_selection"]["mean_per_image_jaccard"] == pytest.approx(float(IMAGE_PARTS["7"]))
    report = format_open_vocabulary_report(summary)
    assert f"{100 * float(DATASET_PARTS):.2f}" in report and "29.67 / 13.21" in report

    # A killed run resumes from its results file: the cut-off second row is scored again, the first is not.
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    (tmp_path / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    resumed = FixedSegments()
    again, _ = evaluate_open_vocabulary(dataset, [resumed], labeler, results_file=tmp_path / "rows.jsonl")
    assert resumed.calls == ["7"] and again == summary
    finished = FixedSegments()  # the file is whole again: nothing left to score
    assert evaluate_open_vocabulary(dataset, [finished], labeler, results_file=tmp_path / "rows.jsonl")[0] == summary
    assert finished.calls == [] and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="other settings"):
        evaluate_open_vocabulary(dataset, [resumed], labeler, results_file=tmp_path / "rows.jsonl", settings={"x": 1})


def test_sam_masks_overlap_rules(hand_made):
    """SAM's masks (largest first): an object pixel takes the largest mask's label, a part pixel the smallest's."""
    dataset, labeler = hand_made
    views = types.SimpleNamespace(key="7", object_map=np.zeros((224, 224)), clip_image=None)
    car, blob, tier = (np.zeros((224, 224), bool) for _ in range(3))
    car[112:, 112:], blob[:112, :112], tier[168:, 112:168] = True, True, True
    sam = SamSegments(lambda image, **kwargs: {"masks": [tier, blob, car]}, points_per_batch=4)
    segments = sam(views)
    assert [int(m.sum()) for m in segments.object_masks] == [12544, 12544, 3136] and segments.authors_keep
    views.clip_image = Image.open(dataset.image_path("n02123045_car.png")).convert("RGB")
    object_map, part_map = labeler(views, segments)
    expected_objects, expected_parts = np.full((224, 224), 2), np.full((224, 224), 4)
    box(112, 112, 224, 224, 1, expected_objects)
    box(0, 0, 112, 112, 0, expected_objects)
    box(112, 112, 224, 224, 2, expected_parts)  # the car mask alone: blue + yellow, of the Car -> Car Body
    box(168, 112, 224, 168, 3, expected_parts)  # the tier mask, smaller, wins
    box(0, 0, 112, 112, 0, expected_parts)
    np.testing.assert_array_equal(object_map, expected_objects)
    np.testing.assert_array_equal(part_map, expected_parts)
    assert not SamSegments(lambda image, **kwargs: {"masks": []})(views).authors_keep


def test_per_image_jaccard_follows_torchmetrics():
    # torchmetrics' documented example: multiclass_jaccard_index([2, 1, 0, 1], [2, 1, 0, 0], num_classes=3) = 0.6667
    prediction, reference = np.array([[2, 1, 0, 1]]), np.array([[2, 1, 0, 0]])
    for num_labels in (3, 6):  # classes absent from prediction and reference are left out, not counted as 0
        result = metrics.per_image_jaccard([prediction], [reference], num_labels)
        assert result["mean_per_image_jaccard"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    second = (np.array([[0, 0, 0, 0]]), np.array([[0, 0, 1, 1]]))
    result = metrics.per_image_jaccard([prediction, second[0]], [reference, second[1]], 3)
    assert result["per_image_jaccard"] == pytest.approx([2 / 3, (1 / 2 + 0) / 2])
    # dataset level: class 0: I = 1 + 2, U = 2 + 4; class 1: I = 1, U = 2 + 2; class 2: 1
    assert result["mean_iou"] == pytest.approx((3 / 6 + 1 / 4 + 1) / 3)
    assert math.isnan(metrics.jaccard_from_counts([0, 0], [0, 0]))

    import evaluate

    from hf_hierseg.evaluation.modules import metric_path

    module = evaluate.load(metric_path("per_image_jaccard"))
    computed = module.compute(predictions=[prediction, second[0]], references=[reference, second[1]], num_labels=3)
    assert computed["mean_per_image_jaccard"] == pytest.approx(result["mean_per_image_jaccard"])
    assert computed["mean_iou"] == pytest.approx(result["mean_iou"])


def test_coco_masks_rle_and_polygons():
    assert decode_compressed_rle("X132T1") == [40, 3, 2, 39]  # hand-encoded: multi-character value, difference
    assert decode_compressed_rle("5n01TO") == [5, 30, 1, 2]  # a negative difference (2 - 30)
    np.testing.assert_array_equal(rle_mask({"size": [2, 2], "counts": "121"}), [[False, True], [True, False]])
    triangle = polygons_mask([[0, 0, 10, 0, 0, 10]], 12, 12)  # pixel centres strictly inside x + y < 10
    rows, columns = np.mgrid[0:12, 0:12]
    np.testing.assert_array_equal(triangle, rows + columns + 1 < 10)
    shifted = polygons_mask(
        [[10.3, 5.7, 30.2, 5.7, 30.2, 20.5, 10.3, 20.5], [0, 0, 1, 1]], 40, 40
    )  # 2 points: skipped
    assert shifted.sum() == 14 * 20 and shifted[6:20, 10:30].all()
    with pytest.raises(ValueError, match="x, y pairs"):
        polygons_mask([[0, 0, 1]], 4, 4)


def test_paper_views_follow_torchvision():
    label_map = np.arange(300 * 400).reshape(300, 400)
    view = paper_label_view(label_map)  # shorter side 224: 224 x 298 (floor), crop offset round(74 / 2) = 37
    # torch's legacy nearest: source index floor(i * scale), scale = in / out in float32
    rows = np.floor(np.arange(224, dtype=np.float32) * np.float32(300 / 224)).astype(int)
    columns = np.floor(np.arange(298, dtype=np.float32) * np.float32(400 / 298)).astype(int)[37 : 37 + 224]
    np.testing.assert_array_equal(view, label_map[rows][:, columns])
    image = smooth_photo(400, 300, 3)
    expected = np.asarray(image.resize((298, 224), Image.BICUBIC))[:, 37:261]
    np.testing.assert_array_equal(np.asarray(paper_image_view(image, resample=Image.BICUBIC)), expected)


def test_mask_dataset_reads_object_and_part_columns():
    import datasets

    rows = []
    for seed in range(2):
        image = smooth_photo(72, 56, seed)
        objects, parts = np.zeros((56, 72), np.uint8), np.zeros((56, 72), np.uint8)
        objects[10:40, 5:50], parts[10:25, 5:50], parts[25:40, 5:50] = 2, 3, 1
        rows.append({"image": image, "object_mask": Image.fromarray(objects), "part_mask": Image.fromarray(parts)})
    dataset = MaskPartDataset(
        datasets.Dataset.from_list(rows), ["none", "dog", "cat"], ["none", "cat body", "dog", "cat head"]
    )
    assert dataset.taxonomy.parts_by_object() == {"dog": ["dog"], "cat": ["cat body", "cat head"]}
    example = dataset[0]
    assert set(np.unique(example.object_map)) == {1, 2} and set(np.unique(example.part_map)) == {0, 2, 3}
    with pytest.raises(ValueError, match="contains no object name"):
        MaskPartDataset(datasets.Dataset.from_list(rows), ["none", "dog"], ["none", "wheel"])


def saved_models(tmp_path, clip, segmenter):
    model, processor = clip
    for name, item in (
        ("cast", segmenter.model),
        ("cast", segmenter.image_processor),
        ("clip", model),
        ("clip", processor),
    ):
        item.save_pretrained(tmp_path / name)
    data = tmp_path / "data"
    write_hand_made_set(data)
    return tmp_path / "cast", tmp_path / "clip", data


def test_the_whole_run_with_cast(tmp_path, clip, segmenter):
    """The run function: CAST's segments (tiny model folder) labelled by the tiny CLIP (folder), COCO files."""
    saved_models(tmp_path, clip, segmenter)
    data = tmp_path / "data"
    run = run_open_vocabulary_evaluation(
        tmp_path / "cast", str(tmp_path / "clip"), annotation_file=data / "val.json", image_root=data, image_size=64
    )
    summary = run["summary"]["cast"]
    assert summary["objects"]["num_images"] == 2 and set(summary["parts"]["per_category_iou"]) == {
        "Cat Head", "Cat Body", "Car Body", "Car Tier", BACKGROUND_LABEL,
    }  # fmt: skip
    assert 0 <= summary["objects"]["mean_per_image_jaccard"] <= 1 and 0 <= summary["parts"]["mean_iou"] <= 1
    assert run["settings"]["masking"] == "fill" and run["settings"]["object_level"] == 4


def test_the_whole_run_with_sam_without_torchvision(tmp_path, clip, segmenter):
    """The SAM baseline runs through transformers' mask-generation pipeline, whose torchvision step is replaced
    (`sam_masks`): a tiny random SAM, whose masks all fall under the pipeline's quality thresholds, so that both
    images have none (everything background) and the authors' selection, which skips such images, keeps neither."""
    _, clip_folder, data = saved_models(tmp_path, clip, segmenter)
    run = run_open_vocabulary_evaluation(
        None, str(clip_folder), annotation_file=data / "val.json", image_root=data, image_size=64, skip_cast=True,
        sam_model=str(save_tiny_sam(tmp_path / "sam")), sam_points_per_batch=256,
    )  # fmt: skip
    assert set(run["summary"]) == {"sam"} and run["settings"]["sam_model"] == str(tmp_path / "sam")
    for kind in ("objects", "parts"):
        summary = run["summary"]["sam"][kind]
        assert summary["num_images"] == 2 and summary["authors_selection"]["num_images"] == 0
        ious = dict(summary["per_category_iou"])
        assert 0 < ious.pop(BACKGROUND_LABEL) < 1 and set(ious.values()) == {0.0}  # all predicted background


@pytest.mark.slow
def test_the_script(tmp_path, clip, segmenter):
    saved_models(tmp_path, clip, segmenter)
    data = tmp_path / "data"
    script = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "evaluate_open_vocabulary.py"), "--model_name_or_path",
         str(tmp_path / "cast"), "--clip_model", str(tmp_path / "clip"), "--annotation_file", str(data / "val.json"),
         "--image_root", str(data), "--image_size", "64", "--output_json", str(tmp_path / "run.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert script.returncode == 0, script.stderr[-3000:]
    assert "| CAST | 2 |" in script.stdout
    written = json.loads((tmp_path / "run.json").read_text())
    assert set(written["summary"]) == {"cast"} and written["settings"]["clip_model"] == str(tmp_path / "clip")


def test_label_segments_without_segments():
    """An image without masks (SAM may return none): everything is background."""
    texts = F.normalize(torch.eye(3), dim=-1)
    model = ColourClip()
    result = label_segments(
        model, [torch.zeros(3, 8, 8)], [torch.zeros(0, 8, 8, dtype=torch.bool)], texts,
        [torch.zeros(0, 8, 8, dtype=torch.bool)], texts[:2], [[0], [1]],
    )[0]  # fmt: skip
    assert (result["object_map"] == 2).all() and (result["part_map"] == 2).all()
    assert paint_masks(torch.zeros(0, 2, 2, dtype=torch.bool), torch.zeros(0, dtype=torch.long), 7).eq(7).all()


def test_tiny_clip_vocabulary_files(tmp_path):
    folder = write_tiny_clip_vocabulary(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(tokenizer("of")["input_ids"])[1] == "of</w>"
