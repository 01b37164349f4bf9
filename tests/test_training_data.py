"""Training data: image folders / parquet / webdataset, map-style and streamed, split by rank and worker, corrupt
records skipped and counted, and an exact resume of the data position."""

import io
import json
import tarfile
from itertools import islice

import datasets
import numpy as np
import pyarrow.parquet
import pytest
import torch
from PIL import Image

from hf_hierseg.image_datasets import (
    UndecodableImageError,
    decode_image,
    image_column_of,
    label_column_of,
    label_names_of,
    load_image_datasets,
)
from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.training.augment import MocoTransform
from hf_hierseg.training.data import SuperpixelBatches, TrainingBatches


CLASSES = ("cat", "dog")


@pytest.fixture(autouse=True)
def no_sleep_after_parquet_streams(monkeypatch):
    """`datasets` sleeps 5 s whenever a streamed parquet iteration ends (an Arrow thread-shutdown workaround):
    seconds per epoch here, nothing at training scale."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def make_image(index, size=16):
    """Image number `index`: random pixels seeded by the index (all different)."""
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8), "RGB")


IMAGE_IDS = {make_image(index).tobytes(): index for index in range(64)}


def identify(image, rng):
    """Test transform: the number of the image (PNG is lossless) and one draw of the record's generator."""
    return {"image_id": torch.tensor(IMAGE_IDS.get(image.tobytes(), -1)), "draw": torch.tensor(rng.random())}


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png():
    """A PNG cut short: the header parses, the pixels do not."""
    return png_bytes(make_image(999, 32))[:60]


def write_image_folder(root):
    """cat/ holds images 0-5, dog/ images 10-15, plus one truncated PNG and one non-image file."""
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(6):
            make_image(10 * label + index).save(root / name / f"{name}_{index}.png")
    (root / "cat" / "cat_truncated.png").write_bytes(truncated_png())
    (root / "dog" / "dog_garbage.jpg").write_bytes(b"this is not an image")
    return root


def write_parquet_shards(root, num_images, num_shards, corrupt_index=None):
    """`num_shards` parquet files of images 0..num_images-1 (label = index % 2); one may be truncated."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    root.mkdir(parents=True)
    per_shard = num_images // num_shards
    for shard in range(num_shards):
        rows = [
            {
                "image": {
                    "bytes": truncated_png() if index == corrupt_index else png_bytes(make_image(index)),
                    "path": None,
                },
                "label": index % 2,
            }
            for index in range(shard * per_shard, (shard + 1) * per_shard)
        ]
        path = root / f"train-{shard:05d}-of-{num_shards:05d}.parquet"
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return root


def write_webdataset_shards(root, num_images, num_shards, corrupt_index=None):
    """webdataset tars: `sampleNNNN.png` + `sampleNNNN.cls` (index % 2)."""
    root.mkdir(parents=True)
    per_shard = num_images // num_shards
    for shard in range(num_shards):
        with tarfile.open(root / f"train-{shard:05d}.tar", "w") as archive:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                image = truncated_png() if index == corrupt_index else png_bytes(make_image(index))
                label = b"%d" % (index % 2)
                for name, payload in ((f"sample{index:04d}.png", image), (f"sample{index:04d}.cls", label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return root


def run_epoch(batches, num_workers=0):
    """(image ids, labels, keys, skipped count) of one epoch, through the DataLoader as training uses it."""
    ids, labels, keys, skipped = [], [], [], 0
    for batch in TrainingBatches(batches, num_workers=num_workers).loader():
        stream = batch.pop("stream")
        skipped += stream["skipped"]
        keys += stream["keys"]
        if batch:
            ids += batch["image_id"].tolist()
            labels += batch["labels"].tolist() if "labels" in batch else []
    return ids, labels, keys, skipped


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_corrupt_images_are_skipped_and_counted(tmp_path, streaming, num_workers):
    split = load_image_datasets(train_dir=str(write_image_folder(tmp_path / "images")), streaming=streaming)["train"]
    assert image_column_of(split) == "image" and label_column_of(split) == "label"
    assert label_names_of(split, "label") == list(CLASSES)
    batches = SuperpixelBatches(split, identify, 2, "image", "label", return_keys=True, drop_last=False)
    ids, labels, keys, skipped = run_epoch(batches, num_workers)
    assert skipped == 2
    assert sorted(ids) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert labels == [image_id // 10 for image_id in ids]  # labels from the class folders
    assert len(set(keys)) == 12 and not any("truncated" in key or "garbage" in key for key in keys)


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_shards_with_a_corrupt_sample(tmp_path, streaming):
    root = write_webdataset_shards(tmp_path / "wds", num_images=8, num_shards=2, corrupt_index=5)
    split = load_image_datasets(dataset_name=str(root), streaming=streaming)["train"]
    image_column, label_column = image_column_of(split), label_column_of(split)
    assert (image_column, label_column) == ("png", "cls")
    batches = SuperpixelBatches(split, identify, 3, image_column, label_column, return_keys=True, drop_last=False)
    ids, labels, keys, skipped = run_epoch(batches, num_workers=2)
    assert skipped == 1
    assert sorted(ids) == [0, 1, 2, 3, 4, 6, 7] and labels == [image_id % 2 for image_id in ids]
    assert sorted(keys) == [f"sample{index:04d}" for index in (0, 1, 2, 3, 4, 6, 7)]


@pytest.mark.parametrize("streaming, num_shards", [(False, 4), (True, 4), (True, 3)])
def test_ranks_get_disjoint_records_that_cover_the_data(tmp_path, streaming, num_shards):
    root = write_parquet_shards(tmp_path / "parquet", num_images=12, num_shards=num_shards)
    per_rank = []
    for rank in range(2):
        split = datasets.load_dataset(str(root), split="train", streaming=streaming)
        batches = SuperpixelBatches(
            split, identify, 1, "image", rank=rank, world_size=2, drop_last=False, shuffle_buffer_size=4
        )
        per_rank.append(run_epoch(batches, num_workers=2)[0])
    assert per_rank[0] and per_rank[1]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))


@pytest.mark.parametrize("streaming, num_shards", [(False, 2), (True, 4), (True, 1)])
def test_resuming_from_a_saved_position_gives_the_same_batches(tmp_path, streaming, num_shards):
    """Interrupt after 5 batches, restore the JSON state in a new iterator, continue across the epoch boundary:
    the same images with the same augmentation draws as an uninterrupted iteration."""
    root = write_parquet_shards(tmp_path / "parquet", num_images=16, num_shards=num_shards, corrupt_index=6)

    def make():
        split = datasets.load_dataset(str(root), split="train", streaming=streaming)
        return TrainingBatches(
            SuperpixelBatches(split, identify, 2, "image", seed=7, shuffle_buffer_size=8), num_workers=2
        )

    uninterrupted = make()
    reference = [batch for batch, _ in islice(uninterrupted, 12)]  # 7 batches per epoch (15 decodable images)
    interrupted = make()
    head = [batch for batch, _ in islice(interrupted, 5)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # as written in a checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    tail = [batch for batch, _ in islice(resumed, 7)]
    assert resumed.position.epoch == 1 and resumed.state_dict() == uninterrupted.state_dict()
    for expected, got in zip(reference, head + tail, strict=True):
        assert torch.equal(expected["image_id"], got["image_id"])
        assert torch.equal(expected["draw"], got["draw"])
    # The second epoch is a new order.
    first_epoch = torch.cat([batch["image_id"] for batch in reference[:7]])
    second_epoch = torch.cat([batch["image_id"] for batch in reference[7:]])
    assert not torch.equal(first_epoch[: len(second_epoch)], second_epoch)


def test_a_dataset_without_decodable_images_raises_instead_of_hanging(tmp_path):
    folder = tmp_path / "broken" / "only_class"
    folder.mkdir(parents=True)
    for index in range(3):
        (folder / f"{index}.png").write_bytes(truncated_png())
    split = load_image_datasets(train_dir=str(tmp_path / "broken"))["train"]
    training = TrainingBatches(SuperpixelBatches(split, identify, 1, "image"), num_workers=2, worker_timeout=60)
    with pytest.raises(ValueError, match=r"no batch.*3 skipped"):
        next(iter(training))


def test_decode_image_raises_a_clear_error():
    with pytest.raises(UndecodableImageError, match="UnidentifiedImageError"):
        decode_image({"bytes": b"not an image", "path": None})
    with pytest.raises(UndecodableImageError):
        decode_image({"bytes": truncated_png(), "path": None})
    assert decode_image({"bytes": png_bytes(make_image(1)), "path": None}).size == (16, 16)


def test_moco_batches_hold_two_views_with_their_superpixels(tmp_path):
    root = write_parquet_shards(tmp_path / "parquet", num_images=4, num_shards=1)
    split = datasets.load_dataset(str(root), split="train")
    transform = MocoTransform(CastImageProcessor(num_superpixels=196), 32)
    batch, _ = next(iter(TrainingBatches(SuperpixelBatches(split, transform, 2, "image"))))
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["superpixels"].shape == (2, 2, 32, 32) and batch["superpixels"].dtype == torch.int64


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="--dataset_name` or a `--train_dir`"):
        load_image_datasets()
    with pytest.raises(ValueError, match="is not a folder"):
        load_image_datasets(train_dir="/nonexistent/folder")
    split = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match="No image column"):
        image_column_of(split)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        SuperpixelBatches(
            datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()})),
            identify,
            0,
            "image",
        )


def test_batches_per_epoch_counts_what_an_epoch_yields(tmp_path):
    """`--num_train_epochs` is turned into steps with `batches_per_epoch` (map-style data)."""
    root = write_parquet_shards(tmp_path / "parquet", num_images=14, num_shards=1)
    split = datasets.load_dataset(str(root), split="train")
    for rank in range(2):
        batches = SuperpixelBatches(split, identify, 2, "image", rank=rank, world_size=2)
        produced = sum(1 for batch in TrainingBatches(batches, num_workers=2).loader() if "image_id" in batch)
        assert batches.batches_per_epoch(num_slots=2) == produced == 3  # 7 records: slots of 4 and 3 -> 2 + 1
    with pytest.raises(ValueError, match="max_train_steps"):
        SuperpixelBatches(
            datasets.load_dataset(str(root), split="train", streaming=True), identify, 2, "image"
        ).batches_per_epoch(1)


# ---------------------------------------------------------------------------------------------------------------
# Data faults beyond single corrupt images
# ---------------------------------------------------------------------------------------------------------------


def corrupt_data_pages(path):
    """Overwrite the first data page of a parquet file: its footer still reads, its rows do not."""
    data = bytearray(path.read_bytes())
    offset = pyarrow.parquet.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data[offset : offset + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_parquet_shards_are_skipped_with_a_warning_naming_them(tmp_path, streaming, caplog):
    root = write_parquet_shards(tmp_path / "parquet", num_images=12, num_shards=3)
    garbage, truncated = root / "train-00000-of-00003.parquet", root / "train-00002-of-00003.parquet"
    garbage.write_bytes(b"not a parquet file")
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with caplog.at_level("WARNING", logger="hf_hierseg.image_datasets"):
        split = load_image_datasets(dataset_name=str(root), streaming=streaming)["train"]
    warnings = [
        record.getMessage() for record in caplog.records if "Skipping the unreadable shard" in record.getMessage()
    ]
    assert len(warnings) == 2
    assert str(garbage) in warnings[0] and "magic bytes" in warnings[0] and str(truncated) in warnings[1]
    batches = SuperpixelBatches(split, identify, 2, "image", "label", drop_last=False)
    assert sorted(run_epoch(batches)[0]) == [4, 5, 6, 7]  # the images of the readable shard


def test_an_unreadable_webdataset_shard_is_skipped(tmp_path, caplog):
    root = write_webdataset_shards(tmp_path / "wds", num_images=8, num_shards=2)
    broken = root / "train-00001.tar"
    broken.write_bytes(broken.read_bytes()[:700])  # cut inside its first member
    with caplog.at_level("WARNING", logger="hf_hierseg.image_datasets"):
        split = load_image_datasets(dataset_name=str(root), streaming=True)["train"]
    assert any(str(broken) in record.getMessage() and "ReadError" in record.getMessage() for record in caplog.records)
    batches = SuperpixelBatches(split, identify, 2, "png", "cls", drop_last=False)
    assert sorted(run_epoch(batches)[0]) == [0, 1, 2, 3]


def test_a_split_without_readable_shards_is_an_error(tmp_path):
    root = write_parquet_shards(tmp_path / "parquet", num_images=4, num_shards=2)
    for path in root.iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"Every shard of split 'train' of .* is unreadable \(2 skipped"):
        load_image_datasets(dataset_name=str(root))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_shard_that_fails_half_way_is_a_clear_error(tmp_path, streaming):
    """Its footer reads (so it is not skipped when loading), its rows do not."""
    root = write_parquet_shards(tmp_path / "parquet", num_images=8, num_shards=1)
    corrupt_data_pages(next(root.iterdir()))
    if not streaming:
        with pytest.raises(ValueError, match=r"Could not prepare the dataset .*OSError.*Fix or remove it"):
            load_image_datasets(dataset_name=str(root))
        return
    split = load_image_datasets(dataset_name=str(root), streaming=True)["train"]
    batches = SuperpixelBatches(split, identify, 2, "image", shuffle=False)
    with pytest.raises(ValueError, match=r"Reading the streamed data failed on rank 0 .*OSError.*shard is unreadable"):
        next(iter(TrainingBatches(batches)))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_parquet_dataset_whose_every_image_fails_is_an_error(tmp_path, streaming):
    root = tmp_path / "parquet"
    root.mkdir()
    features = datasets.Features({"image": datasets.Image()})
    rows = [{"image": {"bytes": truncated_png(), "path": None}} for _ in range(4)]
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "train-00000-of-00001.parquet"))
    split = load_image_datasets(dataset_name=str(root), streaming=streaming)["train"]
    training = TrainingBatches(SuperpixelBatches(split, identify, 1, "image"))
    with pytest.raises(ValueError, match=r"no batch.*4 skipped"):
        next(iter(training))


def test_an_evaluation_split_whose_every_image_fails_is_an_error(tmp_path):
    from accelerate import Accelerator

    from hf_hierseg.training.recipes import Evaluator
    from hf_hierseg.training.supervised import evaluate_classifier

    folder = tmp_path / "broken" / "only_class"
    folder.mkdir(parents=True)
    for index in range(3):
        (folder / f"{index}.png").write_bytes(truncated_png())
    split = load_image_datasets(train_dir=str(tmp_path / "broken"))["train"]
    batches = SuperpixelBatches(split, identify, 2, "image", "label", shuffle=False, drop_last=False)
    evaluator = Evaluator(batches, evaluate_classifier)
    with pytest.raises(ValueError, match=r"no image to evaluate \(3 undecodable image\(s\) skipped\)"):
        evaluator(torch.nn.Linear(1, 1), Accelerator(cpu=True))


@pytest.mark.parametrize("as_dataset_name", [False, True])
def test_an_image_folder_class_without_images_is_an_error(tmp_path, as_dataset_name):
    root = write_image_folder(tmp_path / "images")
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("no images yet")
    (root / ".cache").mkdir()  # hidden folders are not classes
    with pytest.raises(ValueError, match=r"1 class folder\(s\) without images: emu\. They would not be classes"):
        if as_dataset_name:
            load_image_datasets(dataset_name=str(root))
        else:
            load_image_datasets(train_dir=str(root))
    # A class whose images are all corrupt is a class: they are skipped one by one when training.
    (root / "emu" / "broken.png").write_bytes(truncated_png())
    split = load_image_datasets(train_dir=str(root))["train"]
    assert label_names_of(split, "label") == ["cat", "dog", "emu"]
