"""Segmentation fine-tuning: masks to class ids, joint augmentation, image + mask batches, a tiny run with resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_hierseg.image_datasets import check_class_ids, mask_column_of, mask_to_class_ids, reduce_mask_labels
from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.superpixels import denormalize_to_uint8
from hf_hierseg.training.arguments import segmentation_parser
from hf_hierseg.training.augment import encode_view
from hf_hierseg.training.data import TrainingBatches
from hf_hierseg.training.loop import read_metrics
from hf_hierseg.training.segmentation import SegmentationBatches, SegmentationTransform, train_segmentation

from cast_testing import CastModelTester


TESTER = CastModelTester()
COLOURS = [(0, 0, 0), (200, 30, 30), (30, 200, 30), (30, 30, 200)]


def quadrant_class_ids(size=96):
    """Class ids 0..3 in four quadrants of unequal size (so a flip or a shifted crop changes them)."""
    ids = np.zeros((size, size), dtype=np.int64)
    ids[: size // 3, size // 2 :] = 1
    ids[size // 3 :, : size // 4] = 2
    ids[size // 3 :, size // 4 : size // 2] = 3
    return ids


def coloured(ids):
    return Image.fromarray(np.asarray(COLOURS, dtype=np.uint8)[ids], "RGB")


# ---------------------------------------------------------------------------------------------- masks


def test_palette_and_grayscale_masks_give_their_pixel_values():
    ids = quadrant_class_ids(16)
    palette_image = Image.fromarray(ids.astype(np.uint8), "P")
    palette_image.putpalette([v for colour in COLOURS for v in colour])
    assert np.array_equal(mask_to_class_ids(palette_image), ids)
    assert np.array_equal(mask_to_class_ids(Image.fromarray(ids.astype(np.uint8), "L")), ids)
    assert np.array_equal(mask_to_class_ids(Image.fromarray((ids * 300).astype(np.uint16))), ids * 300)
    assert np.array_equal(mask_to_class_ids(ids.astype(np.int32)), ids)
    # Grayscale saved as RGB (equal channels) is read as class ids.
    assert np.array_equal(mask_to_class_ids(Image.fromarray(ids.astype(np.uint8)).convert("RGB")), ids)


def test_rgb_colour_masks_need_a_palette():
    ids = quadrant_class_ids(16)
    with pytest.raises(ValueError, match="RGB colour image: pass a `palette`"):
        mask_to_class_ids(coloured(ids))
    assert np.array_equal(mask_to_class_ids(coloured(ids), palette=COLOURS), ids)
    as_hex = {f"#{r:02x}{g:02x}{b:02x}": index for index, (r, g, b) in enumerate(COLOURS)}
    assert np.array_equal(mask_to_class_ids(np.asarray(coloured(ids).convert("RGBA")), palette=as_hex), ids)
    with pytest.raises(ValueError, match=r"1 colour\(s\) not in the palette: #1e1ec8"):
        mask_to_class_ids(coloured(ids), palette=COLOURS[:3])


def test_bad_mask_values_and_shapes():
    with pytest.raises(ValueError, match="integer class ids"):
        mask_to_class_ids(np.full((4, 4), 1.5))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_to_class_ids(np.zeros((2, 4, 5), dtype=np.int64))
    with pytest.raises(ValueError, match=r"Mask class ids \[7, 9\] are outside 0..6"):
        check_class_ids(np.array([[0, 7], [255, 9]]), num_labels=7, ignore_index=255)
    check_class_ids(np.array([[0, 6], [255, 255]]), num_labels=7, ignore_index=255)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        check_class_ids(np.array([[0, -1]]), num_labels=7)


def test_reduce_labels_keeps_the_ignore_index():
    reduced = reduce_mask_labels(np.array([0, 1, 5, 255]), ignore_index=255)
    assert reduced.tolist() == [255, 0, 4, 255]


# ---------------------------------------------------------------------------------------------- views


def seeds_processor():
    return CastImageProcessor(superpixel_method="seeds", num_superpixels=196, superpixel_recipe="self_supervised")


def grid_processor(num_superpixels=196):
    return CastImageProcessor(superpixel_method="grid", num_superpixels=num_superpixels)


def test_joint_augmentation_keeps_image_and_mask_aligned():
    """The image's colours encode its classes: after crop + flip, the labels must still match the colours."""
    ids = quadrant_class_ids()
    transform = SegmentationTransform(seeds_processor(), 64, num_labels=4, crop_scale=(0.2, 0.6))
    flipped_once = False
    for seed in range(6):
        sample = transform(coloured(ids), Image.fromarray(ids.astype(np.uint8), "L"), np.random.default_rng(seed))
        assert sample["pixel_values"].shape == (3, 64, 64) and sample["labels"].shape == (64, 64)
        image = denormalize_to_uint8(sample["pixel_values"]).astype(np.int64)
        distance = ((image[:, :, None, :] - np.asarray(COLOURS)[None, None]) ** 2).sum(-1)
        colour_ids = distance.argmin(-1)
        agreement = (colour_ids == sample["labels"].numpy()).mean()
        assert agreement > 0.95, (seed, agreement)
        # The top-right class 1 is on the right of the source; a flip puts it on the left.
        columns = np.nonzero((sample["labels"].numpy() == 1).any(0))[0]
        flipped_once |= columns.size > 0 and columns.max() < 40
    assert flipped_once


def test_superpixels_are_computed_on_the_augmented_view():
    ids = quadrant_class_ids()
    processor = seeds_processor()
    transform = SegmentationTransform(processor, 64, num_labels=4)
    sample = transform(coloured(ids), Image.fromarray(ids.astype(np.uint8), "L"), np.random.default_rng(3))
    view = denormalize_to_uint8(sample["pixel_values"])
    _, expected = encode_view(processor, view)
    assert torch.equal(sample["superpixels"], expected)


def test_evaluation_view_resizes_without_randomness():
    ids = quadrant_class_ids()
    transform = SegmentationTransform(grid_processor(), 48, num_labels=4, train=False)
    sample = transform(coloured(ids), Image.fromarray(ids.astype(np.uint8), "L"))
    expected = np.asarray(Image.fromarray(ids.astype(np.int32), "I").resize((48, 48), Image.NEAREST))
    assert np.array_equal(sample["labels"].numpy(), expected)
    # The image is resized (bilinear, as the processor's default) to the labels' size, then normalised.
    resized = np.asarray(coloured(ids).resize((48, 48), Image.BILINEAR))
    np.testing.assert_array_equal(denormalize_to_uint8(sample["pixel_values"]), resized)


def test_bad_pairs_get_clear_errors():
    ids = quadrant_class_ids()
    transform = SegmentationTransform(grid_processor(), 32, num_labels=4, palette=None)
    with pytest.raises(ValueError, match="Mask size 48x96 .* differs from the image size 96x96"):
        transform(coloured(ids), Image.fromarray(ids[:, :48].astype(np.uint8), "L"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside 0..2"):
        SegmentationTransform(grid_processor(), 32, num_labels=3)(
            coloured(ids), Image.fromarray(ids.astype(np.uint8), "L"), np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match="palette"):
        transform(coloured(ids), coloured(ids), np.random.default_rng(0))
    # With the palette, the same colour mask is accepted.
    with_palette = SegmentationTransform(grid_processor(), 32, num_labels=4, palette=COLOURS)
    assert with_palette(coloured(ids), coloured(ids), np.random.default_rng(0))["labels"].max() <= 3


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    from hf_hierseg.evaluation.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_images=8, num_test_images=4, image_size=64
    )


def test_batches_from_imagefolder_and_parquet(synthetic_folder, tmp_path):
    import datasets

    from hf_hierseg.evaluation.synthetic import write_synthetic_dataset

    folder = datasets.load_dataset("imagefolder", data_dir=str(synthetic_folder), split="train")
    parquet_dir = write_synthetic_dataset(
        tmp_path / "parquet", num_images=8, num_test_images=1, image_size=64, format="parquet"
    )
    parquet = datasets.load_dataset("parquet", data_dir=str(parquet_dir / "data"), split="train")
    transform = SegmentationTransform(grid_processor(600), 64, num_labels=7)
    for dataset in (folder, parquet):
        assert mask_column_of(dataset, "image") == "object_mask"
        batches = SegmentationBatches(dataset, transform, 4, "image", "object_mask", seed=0)
        batch, _ = next(iter(TrainingBatches(batches)))
        assert batch["pixel_values"].shape == (4, 3, 64, 64)
        assert batch["superpixels"].shape == batch["labels"].shape == (4, 64, 64)
        assert 0 <= int(batch["labels"].min()) and int(batch["labels"].max()) <= 6
        assert (batch["labels"] > 0).any()


def test_undecodable_mask_is_skipped(synthetic_folder, tmp_path, caplog):
    import datasets

    rows = [json.loads(line) for line in (synthetic_folder / "train" / "metadata.jsonl").read_text().splitlines()]
    folder = tmp_path / "broken"
    (folder / "masks").mkdir(parents=True)
    (folder / "images").mkdir()
    for index, row in enumerate(rows[:3]):
        Image.open(synthetic_folder / "train" / row["file_name"]).save(folder / row["file_name"])
        mask_path = folder / row["object_mask_file_name"]
        if index == 1:
            mask_path.write_bytes(b"not a png")
        else:
            Image.open(synthetic_folder / "train" / row["object_mask_file_name"]).save(mask_path)
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in rows[:3]:
            handle.write(
                json.dumps({"file_name": row["file_name"], "mask_file_name": row["object_mask_file_name"]}) + "\n"
            )
    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    batches = SegmentationBatches(
        dataset,
        SegmentationTransform(grid_processor(600), 64, num_labels=7, train=False),
        3,
        "image",
        "mask",
        shuffle=False,
        drop_last=False,
    )
    got = [batch for batch in batches if "labels" in batch]
    assert len(got) == 1 and got[0]["labels"].shape[0] == 2
    assert "mask does not decode" in caplog.text


# ---------------------------------------------------------------------------------------------- recipe


def run_args(data_dir, output_dir, *extra):
    """The dataclasses of `train_segmentation` for a tiny run (data, model, optimisation, output, evaluation,
    segmentation)."""
    return segmentation_parser().parse_args_into_dataclasses(
        args=[
            "--dataset_name",
            str(data_dir),
            "--label_column_name",
            "object_mask",
            "--num_labels",
            "7",
            "--config_name",
            "cast-small",
            "--config_overrides",
            *TESTER.config_overrides("graph_pooling_num_heads=4"),
            "--superpixel_method",
            "grid",
            "--num_superpixels",
            "600",
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "4",
            "--max_train_steps",
            "4",
            "--logging_steps",
            "1",
            "--checkpointing_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--report_to",
            "jsonl",
            "--output_dir",
            str(output_dir),
            *extra,
        ]
    )


@pytest.mark.slow
def test_tiny_run_evaluates_saves_publishes_and_resumes(synthetic_folder, tmp_path, hub_server):
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModelForSemanticSegmentation

    from hf_hierseg import CastConfig
    from hf_hierseg.modeling_cast import CastForSemanticSegmentation

    output = tmp_path / "run"
    metrics = train_segmentation(
        *run_args(
            synthetic_folder, output, "--eval_steps", "2", "--push_to_hub", "--hub_model_id", "tester/cast-seg-tiny"
        )
    )
    assert 0.0 <= metrics["eval_mean_iou"] <= 1.0 and metrics["eval_samples"] == 4
    logged = read_metrics(output / "metrics.jsonl")
    losses = {line["step"]: line["loss"] for line in logged if "loss" in line}
    assert sorted(losses) == [1, 2, 3, 4]
    assert any("eval_mean_iou" in line and line["step"] == 2 for line in logged)

    AutoModelForSemanticSegmentation.register(CastConfig, CastForSemanticSegmentation, exist_ok=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(output)
    # The saved processor computes what the evaluation views computed (no centre crop), superpixels included.
    from hf_hierseg.image_processing_cast import CastImageProcessor

    processor = CastImageProcessor.from_pretrained(output)
    ids = quadrant_class_ids(96)[:, :80]
    image = coloured(ids)
    inputs = processor(images=image, return_tensors="pt")
    view = SegmentationTransform(grid_processor(600), 64, num_labels=4, train=False)(
        image, Image.fromarray(ids.astype(np.uint8), "L")
    )
    torch.testing.assert_close(inputs["pixel_values"][0], view["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(inputs["superpixels"][0], view["superpixels"])
    assert isinstance(model, CastForSemanticSegmentation) and model.config.num_labels == 7
    assert model.config.freeze_last_pooling is False and model.config.semantic_loss_ignore_index == 255

    files = set(HfApi().list_repo_files("tester/cast-seg-tiny"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_cast.py"} <= files
    published = AutoModelForSemanticSegmentation.from_pretrained("tester/cast-seg-tiny")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, published.state_dict()[name]), name
    assert ModelCard.load("tester/cast-seg-tiny").data.pipeline_tag == "image-segmentation"

    # As if killed after step 2: the resumed run logs the same losses for steps 3 and 4.
    import shutil

    shutil.rmtree(output / "checkpoint-4")
    (output / "metrics.jsonl").unlink()
    train_segmentation(*run_args(synthetic_folder, output, "--resume_from_checkpoint", "latest"))
    resumed = {line["step"]: line["loss"] for line in read_metrics(output / "metrics.jsonl") if "loss" in line}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6)


def test_label_arguments_are_checked(synthetic_folder, tmp_path):
    arguments = run_args(synthetic_folder, tmp_path / "x")
    segmentation_args = arguments[-1]
    segmentation_args.num_labels = None
    with pytest.raises(ValueError, match="--num_labels or --id2label"):
        train_segmentation(*arguments)
    id2label = tmp_path / "id2label.json"
    id2label.write_text(json.dumps({"0": "background", "2": "house"}))
    segmentation_args.id2label = str(id2label)
    with pytest.raises(ValueError, match="0..N-1"):
        train_segmentation(*arguments)


def test_fine_tuning_starts_from_a_classification_checkpoint(tmp_path):
    """--model_name_or_path of an image classifier: the backbone is loaded, fusion and head are new; without
    --ignore_mismatched_sizes the classifier of another number of classes is a clear error."""
    from hf_hierseg import CastForImageClassification
    from hf_hierseg.modeling_cast import CastForSemanticSegmentation
    from hf_hierseg.training.recipes import build_config, load_or_create

    classifier = TESTER.create_model(CastForImageClassification, train=True, num_labels=5)
    classifier.save_pretrained(tmp_path / "classifier")
    _, model_args, *_ = run_args(tmp_path, tmp_path / "out")
    model_args.model_name_or_path, model_args.config_name, model_args.config_overrides = (
        str(tmp_path / "classifier"),
        None,
        None,
    )
    config = build_config(model_args, num_labels=7, freeze_last_pooling=False)
    with pytest.raises(ValueError, match=r"has 5 classes and this run 7.*--ignore_mismatched_sizes") as error:
        load_or_create(CastForSemanticSegmentation, model_args, config)
    assert len(str(error.value).splitlines()) == 1
    model = load_or_create(CastForSemanticSegmentation, model_args, config, ignore_mismatched_sizes=True)
    assert isinstance(model, CastForSemanticSegmentation) and model.classifier.out_features == 7
    for name, value in classifier.cast.state_dict().items():
        if not name.startswith("layernorm."):
            torch.testing.assert_close(model.cast.state_dict()[name], value, msg=name)
    assert all(p.requires_grad for p in model.cast.levels[3].pooling.parameters())


def test_segmentation_run_from_a_checkpoint_with_other_classes_names_the_flag(synthetic_folder, tmp_path):
    from hf_hierseg.modeling_cast import CastForSemanticSegmentation

    config = TESTER.get_config(graph_pooling_num_heads=4, num_labels=10, freeze_last_pooling=False)
    CastForSemanticSegmentation(config).save_pretrained(tmp_path / "ten_classes")
    arguments = run_args(synthetic_folder, tmp_path / "out")
    model_args = arguments[1]
    model_args.model_name_or_path, model_args.config_name, model_args.config_overrides = (
        str(tmp_path / "ten_classes"),
        None,
        None,
    )
    with pytest.raises(ValueError, match=r"ten_classes has 10 classes and this run 7: .*--ignore_mismatched_sizes"):
        train_segmentation(*arguments)
    assert not (tmp_path / "out" / "model.safetensors").exists()
