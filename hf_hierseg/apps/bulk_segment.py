"""Bulk segmentation, what `hf-hierseg segment` runs: image files, folders, globs or a `datasets` image dataset
(streamed or not) segmented in batches, the outputs of `segment_images` written per photo, plus one index of all
photos (JSON lines or parquet).

How the work flows (`segment_collection`): a pool of threads decodes the photos and runs the image processor
(superpixels) of a batch, for the next batches while the model runs on the current one in the main thread (not
beside a multi-threaded CPU forward, which needs the same cores); another pool renders and encodes the pictures and
writes the files. A tqdm bar counts photos (photos/s).

Resuming: a batch whose photos all have their outputs (`segment_images.missing_outputs`) is skipped; any other batch
is segmented again whole, so the photos get the batch partners of an uninterrupted run with the same batch size
(with `config.mask_padding_tokens=False`, the original CAST, a photo's result depends on the photos batched with
it). Every file is written atomically. A photo that does not decode is logged, counted and recorded with its error
(in the index, and in its JSON).

Several processes (`accelerate launch`, any number of machines) split the photos into disjoint shards: a file list
or a map-style dataset by whole batches (rank r takes batches r, r + N, r + 2N, ... of the sorted list, so every
photo has the same batch partners as in a single process), a streamed dataset with
`datasets.distributed.split_dataset_by_node` (as training streams it). Each process writes its own index part;
the main process merges them into OUT/index.jsonl (or index.parquet), sorted by output name.
"""

import dataclasses
import itertools
import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import InvalidInputError, MissingInputError
from ..image_datasets import UndecodableImageError, decode_image
from .segment_images import (
    DEFAULT_OUTPUTS,
    hashed_key,
    missing_outputs,
    output_files,
    output_key,
    read_record,
    render_outputs,
    unique_keys,
    write_atomic,
    write_outputs,
)


logger = logging.getLogger(__name__)

INDEX_FORMATS = ("jsonl", "parquet")
INDEX_NAME = "index"


@dataclasses.dataclass(frozen=True)
class PhotoRecord:
    """One photo to segment: `key` names its output files (unique in the collection), `source` says where it came
    from (a path, or the dataset row), `value` is what `image_datasets.decode_image` reads (a path, `{"bytes",
    "path"}`, a PIL image)."""

    key: str
    source: str
    value: object


@dataclasses.dataclass
class SegmentationSummary:
    """What `segment_collection` did in this process: `rows` (the index rows, in the order of the records),
    `segmented` photos, `skipped` (complete from an earlier run) and `failed` (undecodable)."""

    rows: list = dataclasses.field(default_factory=list)
    segmented: int = 0
    skipped: int = 0
    failed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Photos: files or a dataset, and this process's shard


def file_records(paths):
    """`PhotoRecord`s of image files (their stems name the outputs; repeated stems get a hash of the full path)."""
    paths = [Path(path) for path in paths]
    keys = unique_keys([str(path.resolve()) for path in paths])
    return [PhotoRecord(key, str(path), {"path": str(path), "bytes": None}) for key, path in zip(keys, paths)]


def batch_shard(items, batch_size, rank, world_size):
    """The items of whole batches `rank, rank + world_size, ...` of `items` (a list), in order."""
    return [
        item
        for start in range(rank * batch_size, len(items), world_size * batch_size)
        for item in items[start : start + batch_size]
    ]


def load_photo_dataset(dataset_name, dataset_config_name=None, split="train", streaming=False, image_column=None):
    """`(dataset, image column)`: one split of a `datasets` dataset (a Hub id or a local folder / files that
    `datasets.load_dataset` reads), its images left undecoded (records carry bytes / paths).

    Raises:
        MissingInputError: no such dataset (or not available offline). InvalidInputError: no such split or column.
    """
    import datasets

    from ..image_datasets import image_column_of

    try:
        splits = datasets.load_dataset(dataset_name, dataset_config_name, streaming=streaming)
    except (FileNotFoundError, ConnectionError) as error:
        raise MissingInputError(f"cannot load dataset {dataset_name!r}: {str(error).splitlines()[0]}") from error
    if split not in splits:
        raise InvalidInputError(f"dataset {dataset_name!r} has no split {split!r}; splits: {sorted(splits)}")
    dataset = splits[split]
    try:
        column = image_column_of(dataset, image_column)
    except ValueError as error:
        raise InvalidInputError(str(error)) from error
    return dataset.cast_column(column, datasets.Image(decode=False)), column


def dataset_records(dataset, image_column, batch_size=1, rank=0, world_size=1, name="dataset"):
    """`PhotoRecord`s of this process's shard of a dataset (see the module docstring). Output names: the
    webdataset `__key__`, else the image file names (stems, made unique), else the row number (map-style) or the
    position in the stream (streamed, one process only)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return _stream_records(dataset, image_column, rank, world_size, name)
    keys = _map_style_keys(dataset, image_column)
    indices = batch_shard(list(range(len(dataset))), batch_size, rank, world_size)
    return _map_style_records(dataset, image_column, indices, keys, name)


def _map_style_keys(dataset, image_column):
    if "__key__" in dataset.column_names:
        return [output_key(key) for key in dataset["__key__"]]
    paths = _image_paths(dataset, image_column)
    if paths is not None:
        return unique_keys(paths)
    digits = max(5, len(str(len(dataset) - 1)))
    return [f"{index:0{digits}d}" for index in range(len(dataset))]


def _image_paths(dataset, image_column):
    """The `path` of every image record, read from the Arrow table without its bytes, or None if any is missing."""
    import pyarrow.compute as pc

    column = dataset.data.column(image_column)
    try:
        paths = pc.struct_field(column, "path").to_pylist()
    except (ValueError, TypeError, KeyError, NotImplementedError):
        return None
    if any(not path for path in paths) or len(set(paths)) != len(paths):
        return None
    return paths


def _map_style_records(dataset, image_column, indices, keys, name):
    if not indices:
        return
    for index, row in zip(indices, dataset.select(indices)):
        value = row[image_column]
        path = value.get("path") if isinstance(value, dict) else None
        yield PhotoRecord(keys[index], path or f"{name}[{index}]", value)


def _stream_records(dataset, image_column, rank, world_size, name):
    from datasets.distributed import split_dataset_by_node

    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    for position, row in enumerate(dataset):
        value = row[image_column]
        path = value.get("path") if isinstance(value, dict) else None
        if row.get("__key__"):
            key = output_key(row["__key__"])
        elif path:
            key = hashed_key(path)  # stems may repeat across shards
        elif world_size == 1:
            key = f"{position:08d}"
        else:
            raise InvalidInputError(
                f"the streamed records of {name} have no `__key__` and no image path, so they cannot be named the "
                "same way in every process: run it in one process, or without --streaming"
            )
        yield PhotoRecord(key, path or f"{name}[{position}]", value)


# ---------------------------------------------------------------------------------------------------------------
# The run


def segment_collection(
    segmenter,
    records,
    out,
    outputs=DEFAULT_OUTPUTS,
    levels=(1, 2, 3, 4),
    batch_size=1,
    num_workers=None,
    total=None,
    index_part=None,
    progress=False,
    echo=None,
):
    """Segment `records` (`PhotoRecord`s, an iterable) with a `HierarchicalSegmentationPipeline` and write each
    photo's `outputs` into `out` (see the module docstring for the batches, threads and resuming).

    Args:
        num_workers: threads decoding / processing photos and threads writing files (default: all cores).
        total: the number of records, for the progress bar (None: unknown, e.g. a stream).
        index_part: a file receiving this process's index rows as JSON lines, as they are written.
        progress: show a tqdm bar (photos, photos/s). echo: called with one line per photo written.

    Returns:
        `SegmentationSummary`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    outputs, levels = tuple(outputs), tuple(levels)
    workers = num_workers or os.cpu_count() or 1
    # Batches prepared ahead while the model runs, unless a multi-threaded CPU forward would compete for the cores
    # (as the pipeline decides: `pipelines.threaded_iterator`).
    lookahead = 2 if segmenter.device.type != "cpu" or torch.get_num_threads() == 1 else 0
    summary = SegmentationSummary()
    part = open(index_part, "w", encoding="utf-8") if index_part is not None else None  # noqa: SIM115
    bar = _progress_bar(total, progress)

    def finish(row):
        summary.rows.append(row)
        if part is not None:
            part.write(json.dumps(row) + "\n")
            part.flush()
        bar.update(1)
        if echo is not None and row.get("error") is None and row.get("num_segments") is not None:
            counts = ", ".join(f"level {lv}: {n}" for lv, n in zip(row["levels"], row["num_segments"]))
            written_to = f"{row['key']}.json" if "json" in outputs else f"{row['key']}_*"
            echo(f"{row['source']} -> {out / written_to} ({counts})")

    def prepare(record):
        image = decode_image(record.value)
        return image, segmenter.preprocess(image)

    def write(record, image, result):
        files, photo = render_outputs(record.key, record.source, image, result, outputs)
        write_outputs(out, files)
        return index_row(record, outputs, levels, photo)

    try:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="segment-prepare") as preparing,
            ThreadPoolExecutor(workers, thread_name_prefix="segment-write") as writing,
        ):
            written = deque()  # (future row) in record order, at most a few batches in flight
            batches = _prefetched(_batches(records, batch_size), preparing, prepare, out, outputs, levels, lookahead)
            for batch, prepared in batches:
                if prepared is None:  # complete from an earlier run
                    for record in batch:
                        written.append(_done(complete_row(out, record, outputs, levels)))
                    summary.skipped += len(batch)
                else:
                    photos = []
                    for record, future in zip(batch, prepared):
                        try:
                            photos.append((record, *future.result()))
                        except UndecodableImageError as error:
                            logger.warning("skipping %s: it does not decode (%s)", record.source, error)
                            summary.failed += 1
                            written.append(_done(failed_row(out, record, outputs, levels, str(error))))
                    for record, image, result in _segment(segmenter, photos, levels):
                        written.append(writing.submit(write, record, image, result))
                        summary.segmented += 1
                while written and (written[0].done() or len(written) > 4 * max(batch_size, workers)):
                    finish(written.popleft().result())
            while written:
                finish(written.popleft().result())
    finally:
        bar.close()
        if part is not None:
            part.close()
    return summary


def _batches(records, batch_size):
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield batch


def _prefetched(batches, pool, prepare, out, outputs, levels, lookahead):
    """`(batch, futures of prepare(record) | None if the batch is complete)`, `lookahead` batches submitted ahead
    of the one handed out."""
    pending = deque()
    for batch in batches:
        complete = all(not missing_outputs(out, record.key, outputs, levels) for record in batch)
        pending.append((batch, None if complete else [pool.submit(prepare, record) for record in batch]))
        if len(pending) > lookahead:
            yield pending.popleft()
    yield from pending


def _segment(segmenter, photos, levels):
    """`(record, image, result)` for photos `(record, image, model inputs)` segmented as one batch."""
    if not photos:
        return []
    model_inputs = _collate([inputs for _, _, inputs in photos])
    model_outputs = segmenter.forward(model_inputs)
    return [
        (record, image, segmenter.postprocess(_batch_item(model_outputs, index), levels=levels, return_masks=False))
        for index, (record, image, _) in enumerate(photos)
    ]


def _collate(items):
    """One batch of the pipeline's `preprocess` outputs: tensors concatenated, lists joined."""
    return {
        key: torch.cat([item[key] for item in items]) if torch.is_tensor(items[0][key]) else
        [value for item in items for value in item[key]]
        for key in items[0]
    }  # fmt: skip


def _batch_item(model_outputs, index):
    """Image `index` of a batch of the pipeline's `forward` outputs, as a batch of one."""
    return {key: value[index : index + 1] for key, value in model_outputs.items()}  # tensors and lists


class _done:
    """A finished 'future' holding `value`."""

    def __init__(self, value):
        self.value = value

    def done(self):
        return True

    def result(self):
        return self.value


def _progress_bar(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="photo", desc="segmenting", disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------
# The index


def index_row(record, outputs, levels, photo=None, error=None):
    """One photo's row of the index: output name, source, size, segments per level, files written, error."""
    return {
        "key": record.key,
        "source": record.source,
        "height": photo["height"] if photo else None,
        "width": photo["width"] if photo else None,
        "levels": list(levels),
        "num_segments": [level["num_segments"] for level in photo["levels"]] if photo else None,
        "files": [] if error is not None else output_files(record.key, outputs, levels),
        "error": error,
    }


def complete_row(out, record, outputs, levels):
    """The index row of a photo completed by an earlier run (read back from its JSON, when written)."""
    json_path = Path(out) / f"{record.key}.json"
    photo = read_record(json_path) if json_path.is_file() else None
    if photo is not None and "error" in photo:
        return index_row(record, outputs, levels, error=photo["error"])
    return index_row(record, outputs, levels, photo)


def failed_row(out, record, outputs, levels, error):
    """The index row of an undecodable photo; its JSON (when JSON is an output) records the error."""
    if "json" in outputs:
        text = json.dumps({"image": record.source, "error": error}, indent=1) + "\n"
        write_atomic(Path(out) / f"{record.key}.json", text)
    return index_row(record, outputs, levels, error=error)


def index_part_path(out, rank, world_size):
    return Path(out) / f".{INDEX_NAME}-part-{rank:05d}-of-{world_size:05d}.jsonl"


def merge_index(out, world_size, index_format="jsonl"):
    """Merge the index parts of `world_size` processes into OUT/index.jsonl (or .parquet), rows sorted by output
    name, written atomically; the parts, and temporary files a killed run left, are removed. Returns the index
    path."""
    out = Path(out)
    rows = []
    parts = [index_part_path(out, rank, world_size) for rank in range(world_size)]
    for part in parts:
        with open(part, encoding="utf-8") as lines:
            rows += [json.loads(line) for line in lines if line.strip()]
    rows.sort(key=lambda row: row["key"])
    path = out / f"{INDEX_NAME}.{index_format}"
    if index_format == "jsonl":
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), temporary)
        os.replace(temporary, path)
    # The parts, parts of killed runs with other process counts, and temporary files of killed runs (every process
    # is done now).
    for leftover in [*out.glob(f".{INDEX_NAME}-part-*.jsonl"), *out.glob(".*.tmp")]:
        leftover.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# `hf-hierseg segment`


def run_segment_command(args, load_model):
    """Run `hf-hierseg segment` (the parsed `args`; `load_model(args)` gives the model and processor), in this
    process's shard when launched with several processes. Returns 0 (undecodable photos are counted, logged and
    recorded in the index)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..pipelines import HierarchicalSegmentationPipeline
    from .segment_images import expand_images, parse_outputs

    outputs = parse_outputs(args.outputs)
    if not outputs:
        raise InvalidInputError("--outputs names no output")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as `Accelerator` reads it
    rank, world_size = state.process_index, state.num_processes
    if args.dataset_name is not None:
        dataset, column = load_photo_dataset(
            args.dataset_name, args.dataset_config_name, args.split, args.streaming, args.image_column
        )
        records = dataset_records(dataset, column, args.batch_size, rank, world_size, name=args.dataset_name)
        total = (
            None if args.streaming else len(batch_shard(list(range(len(dataset))), args.batch_size, rank, world_size))
        )
    else:
        records = batch_shard(file_records(expand_images(args.images)), args.batch_size, rank, world_size)
        total = len(records)
    if args.device is None:
        args.device = str(state.device)
    model, processor = load_model(args)
    segmenter = HierarchicalSegmentationPipeline(model=model, image_processor=processor, device=model.device)
    summary = segment_collection(
        segmenter,
        records,
        args.out,
        outputs=outputs,
        levels=args.levels,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        total=total,
        index_part=index_part_path(args.out, rank, world_size),
        progress=state.is_main_process and not args.quiet,
        echo=None if args.quiet else _echo,
    )
    print(
        f"process {rank} of {world_size}: {summary.segmented} photos segmented, {summary.skipped} complete from an "
        f"earlier run, {summary.failed} undecodable",
        file=sys.stderr,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        index = merge_index(args.out, world_size, args.index_format)
        print(f"index of all photos: {index}", file=sys.stderr)
    return 0


def write_segmentations(segmenter, images, out, levels=(1, 2, 3, 4), batch_size=1, outputs=DEFAULT_OUTPUTS):
    """Segment image files with a `HierarchicalSegmentationPipeline` and write, per image, its `outputs` into `out`
    (`segment_collection`), one line per image on stdout. Returns the JSON records (`segment_images.
    segment_record`), in the order of `images` (the index rows where JSON is not an output)."""
    records = file_records(images)
    summary = segment_collection(
        segmenter, records, out, outputs=outputs, levels=levels, batch_size=batch_size, echo=print
    )
    if "json" not in outputs:
        return summary.rows
    return [read_record(Path(out) / f"{record.key}.json") for record in records]


def _echo(line):
    from tqdm.auto import tqdm

    tqdm.write(line)


__all__ = [
    "INDEX_FORMATS",
    "PhotoRecord",
    "SegmentationSummary",
    "batch_shard",
    "dataset_records",
    "file_records",
    "load_photo_dataset",
    "merge_index",
    "run_segment_command",
    "segment_collection",
    "write_segmentations",
]
