"""Training data from `datasets`: image folders, parquet with an `Image` column and webdataset tar shards, map-style
or streamed, split across processes, decoded / augmented / given superpixels in DataLoader workers.

The order of the records is a function of (seed, epoch, rank, number of workers) only, and every record's
augmentation draws from its own generator seeded with (seed, epoch, rank, worker slot, position). So the position
in the data is a few integers (`StreamPosition`), saved with each checkpoint, and a resumed run sees exactly the
batches the interrupted run would have seen. Undecodable images are skipped, logged and counted.

How the records are split:
* across processes: a map-style dataset is permuted with (seed, epoch) and rank r takes every world_size-th index
  (as `DistributedSampler`, without padding); a streamed dataset goes through
  `datasets.distributed.split_dataset_by_node` (whole shards per process when their number divides evenly, else
  every world_size-th record);
* across DataLoader workers ("slots"): a map-style dataset's indices are dealt round-robin; a streamed dataset is
  split by shards (`IterableDataset.shard`) when it has at least as many shards as workers, else round-robin on records.
Each worker builds whole batches; the DataLoader takes them from the workers in turn.
"""

import logging
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info

from ..errors import InvalidInputError
from ..image_datasets import UndecodableImageError, decode_image
from .interruption import ignore_stop_signals


logger = logging.getLogger(__name__)


def without_image_decoding(dataset, image_column):
    """Cast the image column to `Image(decode=False)`: records carry bytes / paths, decoded in `decode_image`."""
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def record_key(example, image_value, fallback):
    """A readable id of a record for logs: webdataset `__key__`, the image path, the index in a map-style dataset,
    or `fallback` (the position in the stream)."""
    if example.get("__key__"):
        return str(example["__key__"])
    if isinstance(image_value, dict) and image_value.get("path"):
        return str(image_value["path"])
    if "__index__" in example:
        return f"index {example['__index__']}"
    return fallback


def collate_samples(samples):
    """Stack per-sample tensors / ints into a batch dict."""
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values)
    return batch


class SuperpixelBatches(torch.utils.data.IterableDataset):
    """Batches of augmented views with their superpixels, built in DataLoader workers.

    Args:
        dataset: a `datasets.Dataset` or `datasets.IterableDataset` (the full split; this class splits it by rank).
        transform: callable (PIL RGB image, numpy Generator) -> dict of tensors (e.g. `augment.MocoTransform`).
        batch_size: samples per batch (per process).
        image_column: column with the images; label_column: optional integer label column (-> "labels").
        seed: seeds the order and the augmentations. shuffle: permute (map-style) / shuffle buffer (streamed).
        shuffle_buffer_size: buffer of a streamed dataset's shuffle.
        rank, world_size: this process and the number of processes.
        drop_last: drop each worker's last incomplete batch (training) or keep it (evaluation).
        return_keys: add the ids of the records of each batch (webdataset key / path) under `stream["keys"]`.

    Every yielded dict carries `stream = {"slot", "position", "skipped", "keys"}`: the worker slot, the next
    position in that slot's records, and how many undecodable records were skipped since its previous batch. A dict
    with only `stream` reports skipped records at the end of a slot.
    """

    def __init__(
        self,
        dataset,
        transform,
        batch_size,
        image_column,
        label_column=None,
        seed=0,
        shuffle=True,
        shuffle_buffer_size=10_000,
        rank=0,
        world_size=1,
        drop_last=True,
        return_keys=False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        dataset = without_image_decoding(dataset, image_column)
        if self.streaming:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
            if shuffle:
                dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.dataset = dataset
        self.transform = transform
        self.batch_size = batch_size
        self.image_column = image_column
        self.label_column = label_column
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.return_keys = return_keys
        # Where iteration starts; set by `TrainingBatches` before each DataLoader iterator is created.
        self.epoch = 0
        self.slot_positions = None
        self.slot_offset = 0

    def set_position(self, epoch, slot_positions=None, slot_offset=0):
        """Start the next iteration in `epoch`, slot s at record `slot_positions[s]`, worker w acting as slot
        (w + slot_offset) % num_workers (so the DataLoader's round-robin resumes at the right slot)."""
        self.epoch, self.slot_positions, self.slot_offset = epoch, slot_positions, slot_offset

    def batches_per_epoch(self, num_slots):
        """Full batches in one epoch of the process with the fewest records (the same number on every process),
        with `num_slots` workers; map-style data, before skipping undecodable images."""
        if self.streaming:
            raise InvalidInputError("A streamed dataset has no known length: give --max_train_steps.")
        per_rank = len(self.dataset) // self.world_size
        return sum(len(range(slot, per_rank, num_slots)) // self.batch_size for slot in range(num_slots))

    def slot_records(self, slot, num_slots, start):
        """Yield (position, example) of one slot's records from `start`, undecoded."""
        if not self.streaming:
            order = np.arange(len(self.dataset))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            order = order[self.rank :: self.world_size][slot::num_slots]
            for position in range(start, len(order)):
                example = self.dataset[int(order[position])]
                example["__index__"] = int(order[position])
                yield position, example
            return
        stream, every = self.dataset, 1
        if num_slots > 1:
            if stream.num_shards >= num_slots:
                stream = stream.shard(num_shards=num_slots, index=slot, contiguous=False)
            else:
                every = num_slots
        stream.set_epoch(self.epoch)
        # `iter(batch_size=1)` rather than `__iter__`: inside a worker, `__iter__` would split the shards again.
        records, index = stream.iter(batch_size=1), -1
        while True:
            try:
                rows = next(records)
            except StopIteration:
                return
            except Exception as error:  # a shard that fails to read half-way (pyarrow, tarfile, ... errors)
                raise InvalidInputError(
                    f"Reading the streamed data failed on rank {self.rank} (worker slot {slot}, epoch {self.epoch}) "
                    f"after {index + 1} records: {type(error).__name__}: {' '.join(str(error).split())}. "
                    "A shard is unreadable: fix or remove it (local shards are checked, and skipped, when the "
                    "dataset is loaded), then resume with --resume_from_checkpoint latest."
                ) from error
            index += 1
            if index % every != slot % every:
                continue
            position = index // every
            if position >= start:
                yield position, {key: values[0] for key, values in rows.items()}

    def __iter__(self):
        worker = get_worker_info()
        num_slots, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        slot = (worker_id + self.slot_offset) % num_slots
        start = self.slot_positions[slot] if self.slot_positions else 0
        samples, keys, skipped, end = [], [], 0, start
        for position, example in self.slot_records(slot, num_slots, start):
            end = position + 1
            image_value = example[self.image_column]
            key = record_key(example, image_value, f"rank {self.rank} slot {slot} position {position}")
            try:
                image = decode_image(image_value)
            except UndecodableImageError as error:
                skipped += 1
                logger.warning("Skipping undecodable image %s (epoch %d): %s", key, self.epoch, error)
                continue
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, slot, position])
            samples.append(self.make_sample(example, image, rng))
            keys.append(key)
            if len(samples) == self.batch_size:
                yield self.pack(samples, keys, slot, end, skipped)
                samples, keys, skipped = [], [], 0
        if samples and not self.drop_last:
            yield self.pack(samples, keys, slot, end, skipped)
        elif skipped or samples:
            yield {"stream": self.stream_info(slot, end, skipped, [])}

    def make_sample(self, example, image, rng):
        """One sample: the transformed image (+ its label). Subclasses may use other columns of `example`."""
        sample = self.transform(image, rng)
        if self.label_column is not None:
            sample["labels"] = int(example[self.label_column])
        return sample

    def pack(self, samples, keys, slot, position, skipped):
        batch = collate_samples(samples)
        batch["stream"] = self.stream_info(slot, position, skipped, keys)
        return batch

    def stream_info(self, slot, position, skipped, keys):
        return {"slot": slot, "position": position, "skipped": skipped, "keys": keys if self.return_keys else []}


@dataclass
class StreamPosition:
    """Where a process is in its training data; saved in every checkpoint (one per rank)."""

    epoch: int = 0
    batches_in_epoch: int = 0
    next_slot: int = 0
    slot_positions: list = field(default_factory=list)
    num_slots: int = 1
    world_size: int = 1
    samples_seen: int = 0
    skipped_images: int = 0

    def to_dict(self):
        return asdict(self)


class TrainingBatches:
    """Endless iterator over training batches, epoch after epoch, that tracks its `StreamPosition`.

    Each process iterates its own data independently: processes step in lockstep for as many steps as the training
    runs, whatever the number of batches per epoch on each (their epochs may end a batch apart).

    Close the iterator when done (`contextlib.closing(iter(batches))`), also on an error: that stops its DataLoader
    workers. Left to the interpreter's exit (an uncaught error keeps the frames alive), they would block it for ever:
    PyTorch then leaves them to multiprocessing, which terminates them with SIGTERM, and they ignore SIGTERM
    (`ignore_stop_signals`). The same holds for `evaluation_loader`.
    """

    def __init__(self, batches: SuperpixelBatches, num_workers=0, pin_memory=False, worker_timeout=600.0):
        self.batches = batches
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.worker_timeout = worker_timeout
        num_slots = max(1, num_workers)
        self.position = StreamPosition(
            slot_positions=[0] * num_slots, num_slots=num_slots, world_size=batches.world_size
        )

    def state_dict(self):
        return self.position.to_dict()

    def load_state_dict(self, state):
        """Restore a saved position. A different number of workers or processes changes the order of the
        records, so the position cannot carry over: the saved epoch restarts from its beginning (with a warning)."""
        saved = StreamPosition(**state)
        if (saved.num_slots, saved.world_size) != (self.position.num_slots, self.position.world_size):
            logger.warning(
                "The checkpoint's data position was saved with %d worker slot(s) x %d process(es), this run has "
                "%d x %d: epoch %d restarts from its beginning.",
                saved.num_slots,
                saved.world_size,
                self.position.num_slots,
                self.position.world_size,
                saved.epoch,
            )
            self.position = StreamPosition(
                epoch=saved.epoch,
                slot_positions=[0] * self.position.num_slots,
                num_slots=self.position.num_slots,
                world_size=self.position.world_size,
                samples_seen=saved.samples_seen,
                skipped_images=saved.skipped_images,
            )
        else:
            self.position = saved

    def loader(self):
        position = self.position
        self.batches.set_position(position.epoch, list(position.slot_positions), position.next_slot)
        return DataLoader(
            self.batches,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            timeout=self.worker_timeout if self.num_workers > 0 else 0,
            worker_init_fn=ignore_stop_signals,  # SIGTERM / SIGUSR1 are the training process's to handle
            # Its own generator, so creating an iterator does not consume the global RNG (restored on resume).
            generator=torch.Generator().manual_seed(0),
        )

    def __iter__(self):
        while True:
            position = self.position
            from_start = not any(position.slot_positions)
            produced = False
            for batch in self.loader():
                stream = batch.pop("stream")
                position.slot_positions[stream["slot"]] = stream["position"]
                position.next_slot = (stream["slot"] + 1) % position.num_slots
                position.skipped_images += stream["skipped"]
                if stream["skipped"]:
                    logger.warning(
                        "%d undecodable image(s) skipped so far on rank %d.",
                        position.skipped_images,
                        self.batches.rank,
                    )
                if not batch:
                    continue
                position.batches_in_epoch += 1
                position.samples_seen += len(next(iter(batch.values())))
                produced = True
                yield batch, stream["keys"]
            if from_start and not produced:
                raise InvalidInputError(
                    f"Epoch {position.epoch} gave rank {self.batches.rank} no batch: the dataset is empty, all its "
                    f"images are undecodable ({position.skipped_images} skipped), or each of the "
                    f"{position.num_slots} worker(s) gets fewer than --per_device_train_batch_size="
                    f"{self.batches.batch_size} images. Use fewer processes / workers or a smaller batch."
                )
            self.position = StreamPosition(
                epoch=position.epoch + 1,
                slot_positions=[0] * position.num_slots,
                num_slots=position.num_slots,
                world_size=position.world_size,
                samples_seen=position.samples_seen,
                skipped_images=position.skipped_images,
            )


def datasets_transform(transform, image_column, label_column=None):
    """A function for `datasets.Dataset.with_transform` that turns records into `pixel_values`, `superpixels` (and
    `labels`), e.g. to train with the transformers `Trainer` (`remove_unused_columns=False`). Each sample's
    augmentation draws from a generator seeded from torch's RNG (which the `Trainer` seeds). Unlike
    `SuperpixelBatches`, an undecodable image raises `UndecodableImageError` here."""

    def apply(examples):
        samples = []
        for index, value in enumerate(examples[image_column]):
            image = decode_image(value)
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            sample = transform(image, rng)
            if label_column is not None:
                sample["labels"] = int(examples[label_column][index])
            samples.append(sample)
        return {key: [sample[key] for sample in samples] for key in samples[0]}

    return apply


def evaluation_loader(batches: SuperpixelBatches, num_workers=0, worker_timeout=600.0):
    """One pass over evaluation batches (no shuffling, last batch kept); yields (batch, skipped count). Close it
    when done, also on an error (`contextlib.closing`; see `TrainingBatches`)."""
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=num_workers,
        timeout=worker_timeout if num_workers > 0 else 0,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(0),
    )
    for batch in loader:
        stream = batch.pop("stream")
        yield batch, stream["skipped"]


__all__ = [
    "StreamPosition",
    "SuperpixelBatches",
    "TrainingBatches",
    "datasets_transform",
    "evaluation_loader",
]
