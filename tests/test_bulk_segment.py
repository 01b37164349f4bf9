"""Bulk segmentation (`hf-hierseg segment`, `hf_hierseg.apps.bulk_segment`): files, folders, globs and `datasets`
image datasets; label maps and JSON equal to the pipeline's; one index of all photos; interrupted and killed runs
resume to the outputs of an uninterrupted run; undecodable photos recorded; two processes split the photos and
write what one process writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import accelerate_launch
from PIL import Image

from hf_hierseg import load_default
from hf_hierseg.apps import bulk_segment, segment_images
from hf_hierseg.apps.segment_images import expand_images, unique_keys
from hf_hierseg.cli import main
from hf_hierseg.errors import MissingInputError
from hf_hierseg.pipelines import HierarchicalSegmentationPipeline


SIZES = [(96, 72), (80, 80), (64, 100), (120, 90), (72, 72)]


def photo(width, height, seed):
    """Smooth random colours with a little noise (SEEDS has edges to follow)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray(np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for index, size in enumerate(SIZES):
        photo(*size, seed=index).save(folder / f"photo{index}.png")
    return folder


@pytest.fixture(scope="module")
def segmenter():
    model, processor = load_default()
    return HierarchicalSegmentationPipeline(model=model, image_processor=processor)


def run(argv, capsys):
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def contents(folder):
    """{file name: bytes} of a finished output folder (no hidden files may remain)."""
    names = sorted(os.listdir(folder))
    assert not [name for name in names if name.startswith(".")], names
    return {name: (Path(folder) / name).read_bytes() for name in names}


def index_rows(folder):
    return [json.loads(line) for line in (Path(folder) / "index.jsonl").read_text().splitlines()]


# -- inputs ------------------------------------------------------------------------------------------------------------


def test_files_folders_and_globs(photos, tmp_path):
    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    photo(40, 40, 9).save(nested / "photo0.png")  # the same stem as photos/photo0.png
    (tmp_path / "nested" / "notes.txt").write_text("not an image")
    found = expand_images([photos, f"{tmp_path}/**/*.png"])
    assert found == sorted(photos.glob("*.png")) + [nested / "photo0.png"]
    keys = unique_keys([str(path.resolve()) for path in found])
    assert len(set(keys)) == len(keys) and keys[1:5] == ["photo1", "photo2", "photo3", "photo4"]
    assert keys[0].startswith("photo0-") and keys[-1].startswith("photo0-") and keys[0] != keys[-1]
    with pytest.raises(MissingInputError, match="no images match"):
        expand_images([f"{tmp_path}/*.jpg"])
    with pytest.raises(MissingInputError, match="no such image"):
        expand_images([tmp_path / "missing.png"])


# -- outputs -----------------------------------------------------------------------------------------------------------


def test_label_maps_and_json_are_the_pipelines(photos, segmenter, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["segment", photos, "--out", out, "--outputs", "labels,json", "--levels", "0", "2", "4", "--batch-size", 3]
    status, stdout, err = run(argv, capsys)
    assert status == 0, err
    paths = sorted(photos.glob("*.png"))
    expected = segmenter([str(path) for path in paths], levels=[0, 2, 4], batch_size=3)
    names = set(os.listdir(out))
    assert not any(name.endswith("_hierarchy.png") or name.endswith("_level2.png") for name in names)
    for path, result in zip(paths, expected):
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert (record["image"], record["height"], record["width"]) == (str(path), *result["size"])
        for level, entry in zip(record["levels"], result["levels"]):
            labels = np.asarray(Image.open(out / f"{path.stem}_level{entry['level']}_labels.png"))
            assert labels.dtype == np.uint16
            np.testing.assert_array_equal(labels, entry["segmentation"])
            assert level["level"] == entry["level"] and level["num_segments"] == len(entry["segments"])
            assert level["segments"] == [
                {key: segment[key] for key in ("id", "parent", "area", "bbox")} for segment in entry["segments"]
            ]
        assert f"{path} -> {out / path.stem}" in stdout
    rows = index_rows(out)
    assert [row["key"] for row in rows] == [path.stem for path in paths]
    for row, result in zip(rows, expected):
        assert row["error"] is None and (row["height"], row["width"]) == result["size"]
        assert row["num_segments"] == [len(entry["segments"]) for entry in result["levels"]]
        assert all((out / name).is_file() for name in row["files"]) and len(row["files"]) == 4


def test_parquet_index(photos, tmp_path, capsys):
    import pyarrow.parquet as pq

    status, _, err = run(["segment", photos, "--out", tmp_path, "--outputs", "json", "--index-format", "parquet",
                          "--quiet"], capsys)  # fmt: skip
    assert status == 0, err
    table = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert [row["key"] for row in table] == [f"photo{index}" for index in range(len(SIZES))]
    assert all(row["files"] == [f"{row['key']}.json"] and row["num_segments"] for row in table)


def test_undecodable_photos_are_recorded_and_not_retried(photos, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(photos.glob("*.png"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    status, _, err = run(["segment", folder, "--out", out, "--outputs", "json", "--quiet"], capsys)
    assert status == 0 and "1 undecodable" in err
    broken = json.loads((out / "broken.json").read_text())
    assert broken["image"] == str(folder / "broken.png") and "error" in broken
    rows = {row["key"]: row for row in index_rows(out)}
    assert rows["broken"]["error"] and rows["broken"]["files"] == [] and rows["photo0"]["error"] is None
    status, _, err = run(["segment", folder, "--out", out, "--outputs", "json", "--quiet"], capsys)
    assert status == 0 and "0 photos segmented, 3 complete from an earlier run" in err


# -- resuming ----------------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_outputs_of_an_uninterrupted_run(photos, segmenter, tmp_path, monkeypatch):
    records = bulk_segment.file_records(sorted(photos.glob("*.png")))
    reference = tmp_path / "reference"
    bulk_segment.segment_collection(segmenter, records, reference, outputs=segment_images.OUTPUT_KINDS, batch_size=2)

    out = tmp_path / "out"
    write = segment_images.write_atomic
    written = []

    def write_then_stop(path, data):  # the run dies at its 24th file: photos 0 and 1 (10 files each) are complete
        if len(written) == 23:
            raise Interrupted
        write(path, data)
        written.append(Path(path).name)

    monkeypatch.setattr(segment_images, "write_atomic", write_then_stop)
    with pytest.raises(Interrupted):  # one writer thread: the files come in order
        bulk_segment.segment_collection(
            segmenter, records, out, outputs=segment_images.OUTPUT_KINDS, batch_size=2, num_workers=1
        )
    monkeypatch.undo()
    assert len(written) == 23 and not any(name.startswith(".") for name in os.listdir(out))
    levels = (1, 2, 3, 4)
    complete = [
        r.key for r in records if not segment_images.missing_outputs(out, r.key, segment_images.OUTPUT_KINDS, levels)
    ]
    assert complete == ["photo0", "photo1"] and (out / "photo2_level1_labels.png").is_file()

    summary = bulk_segment.segment_collection(
        segmenter, records, out, outputs=segment_images.OUTPUT_KINDS, batch_size=2
    )
    # Whole batches only are skipped: photo 2 is segmented again with its partner, photo 3, as in one run.
    assert (summary.skipped, summary.segmented, summary.failed) == (2, 3, 0)
    assert contents(out) == contents(reference)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_outputs_of_an_uninterrupted_run(photos, tmp_path):
    """`hf-hierseg segment` killed with SIGKILL while it writes: no partial file under an output name, and the run
    started again completes the outputs, equal to an uninterrupted run's."""
    many = tmp_path / "photos"
    many.mkdir()
    for index in range(24):
        photo(160, 120, seed=100 + index).save(many / f"photo{index:02d}.png")
    command = [sys.executable, "-m", "hf_hierseg", "segment", many, "--batch-size", "2", "--quiet", "--out"]
    reference = tmp_path / "reference"
    subprocess.run([*map(str, command), str(reference)], check=True, timeout=600, capture_output=True)
    out = tmp_path / "out"
    process = subprocess.Popen([*map(str, command), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("*.json"))) < 4 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finished = len(list(out.glob("*.json")))
    assert 4 <= finished < 24, "the run was not killed in the middle"
    for name in os.listdir(out):
        if name.endswith(".png") and not name.startswith("."):
            Image.open(out / name).load()  # every file under an output name is whole
        elif name.endswith(".json"):
            json.loads((out / name).read_text())
    completed = subprocess.run([*map(str, command), str(out)], timeout=600, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "complete from an earlier run" in completed.stderr
    assert contents(out) == contents(reference)


# -- datasets ----------------------------------------------------------------------------------------------------------


def test_an_image_dataset_map_style_and_streamed(photos, tmp_path, capsys):
    files = tmp_path / "files"
    status, _, err = run(["segment", photos, "--out", files, "--outputs", "labels,json", "--quiet"], capsys)
    assert status == 0, err
    expected = contents(files)

    mapped = tmp_path / "mapped"
    status, _, err = run(["segment", "--dataset_name", photos, "--image_column", "image", "--out", mapped,
                          "--outputs", "labels,json", "--quiet"], capsys)  # fmt: skip
    assert status == 0, err
    assert contents(mapped) == expected  # the same names (the file stems), batches and bytes

    streamed = tmp_path / "streamed"
    status, _, err = run(["segment", "--dataset_name", photos, "--streaming", "--out", streamed, "--outputs",
                          "labels,json", "--quiet"], capsys)  # fmt: skip
    assert status == 0, err
    rows = index_rows(streamed)
    assert len(rows) == len(SIZES)
    by_source = {row["source"]: row["key"] for row in rows}
    for index in range(len(SIZES)):  # streamed paths name outputs by stem and a hash of the path
        key = by_source[str(photos / f"photo{index}.png")]
        assert key.startswith(f"photo{index}-")
        for suffix in ("_level1_labels.png", "_level4_labels.png"):
            assert (streamed / f"{key}{suffix}").read_bytes() == expected[f"photo{index}{suffix}"]

    status, _, err = run(["segment", "--dataset_name", tmp_path / "missing", "--out", tmp_path / "x"], capsys)
    assert status == 1 and len(err.strip().splitlines()) == 1 and "missing" in err


# -- several processes -------------------------------------------------------------------------------------------------


def launch_two_processes(arguments, cwd):
    """`hf-hierseg segment ARGUMENTS` under `accelerate launch` with two CPU processes."""
    launcher = [*accelerate_launch(2), "-m", "hf_hierseg", "segment"]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*launcher, *map(str, arguments)], capture_output=True, text=True, timeout=900, cwd=cwd, env=environment
    )


@pytest.mark.slow
def test_two_processes_segment_disjoint_shards_with_the_outputs_of_one(photos, tmp_path, capsys):
    many = tmp_path / "photos"
    many.mkdir()
    for index in range(9):
        photo(96, 72, seed=200 + index).save(many / f"photo{index}.png")
    one = tmp_path / "one"
    assert run(["segment", many, "--out", one, "--batch-size", "2"], capsys)[0] == 0
    two = tmp_path / "two"
    completed = launch_two_processes([many, "--out", two, "--batch-size", "2"], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Disjoint and complete: each photo segmented by exactly one process (batches 0, 2, 4 and 1, 3 of 2 photos).
    assert "process 0 of 2: 5 photos segmented" in completed.stderr
    assert "process 1 of 2: 4 photos segmented" in completed.stderr
    assert sorted(line.split(" -> ")[0] for line in completed.stdout.splitlines() if " -> " in line) == sorted(
        str(path) for path in many.glob("*.png")
    )
    assert contents(two) == contents(one)  # the same files, bytes and merged index; the index parts removed

    # A streamed dataset goes through datasets' split_dataset_by_node (batch 1: every photo alone in both runs).
    one_stream, two_stream = tmp_path / "one-stream", tmp_path / "two-stream"
    arguments = ["--dataset_name", many, "--streaming", "--batch-size", "1", "--outputs", "labels,json"]
    assert run(["segment", *arguments, "--out", one_stream, "--quiet"], capsys)[0] == 0
    completed = launch_two_processes([*arguments, "--out", two_stream, "--quiet"], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    counts = [int(line.split(": ")[1].split(" ")[0]) for line in completed.stderr.splitlines() if " of 2: " in line]
    assert sorted(counts) == [4, 5]
    assert contents(two_stream) == contents(one_stream)


def test_batch_shards_are_disjoint_complete_and_keep_batches():
    items = list(range(11))
    shards = [bulk_segment.batch_shard(items, 3, rank, 2) for rank in range(2)]
    assert shards == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert sorted(shards[0] + shards[1]) == items
    assert bulk_segment.batch_shard(items, 4, 2, 3) == [8, 9, 10]
    assert bulk_segment.batch_shard(items, 4, 0, 1) == items


def test_collate_and_batch_items_round_trip(segmenter, photos):
    """The runner batches the pipeline's own `preprocess` outputs and splits its `forward` outputs as transformers'
    pipeline iterator does: the same results as the pipeline called on the batch."""
    paths = sorted(photos.glob("*.png"))[:3]
    images = [Image.open(path).convert("RGB") for path in paths]
    prepared = [(path, image, segmenter.preprocess(image)) for path, image in zip(paths, images)]
    results = [result for _, _, result in bulk_segment._segment(segmenter, prepared, (1, 3))]
    expected = segmenter(images, levels=[1, 3], batch_size=3, return_masks=False)
    for result, reference in zip(results, expected, strict=True):
        assert result["size"] == reference["size"]
        for entry, reference_entry in zip(result["levels"], reference["levels"], strict=True):
            np.testing.assert_array_equal(entry["segmentation"], reference_entry["segmentation"])
            assert entry["segments"] == reference_entry["segments"]
    assert torch.is_tensor(prepared[0][2]["pixel_values"])
