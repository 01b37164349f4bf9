"""Prepare the next batches while the model runs on the current one.

    from hf_hierseg.prefetch import prefetched, processed_batches

    for images, inputs in processed_batches(processor, batches_of_images, lookahead=1):
        outputs = model(**inputs)  # SEEDS of the next batch runs meanwhile in a worker thread

`prefetched(items, function)` yields `function(item)` for every item, in order, with up to `lookahead` later items
already submitted to a thread pool. It pays where `function` releases the GIL (OpenCV's SEEDS, numpy, PIL decoding)
and the model leaves some of the machine idle: a GPU forward, or a CPU forward dominated by per-op overhead at
small batch. A CPU forward already using every core gains little (the threads share the same cores); see
`pipelines.threaded_iterator` for how the pipelines choose.
"""

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor


def prefetched(items, function, lookahead=1, num_workers=1):
    """Yield `function(item)` for each of `items` (any iterable), in order, computing up to `lookahead` items
    ahead of the one being consumed in `num_workers` threads.

    An exception raised by `function` is raised here, at the item it belongs to. Stopping early (break, close)
    cancels the work not started yet and waits for the running calls. `lookahead=0` computes each item only when it
    is asked for (no overlap: the same results, sequentially).
    """
    lookahead, num_workers = int(lookahead), int(num_workers)
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}.")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    iterator = iter(items)
    if lookahead == 0:
        for item in iterator:
            yield function(item)
        return
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="hf-hierseg-prefetch") as pool:
        pending = collections.deque(pool.submit(function, item) for item in itertools.islice(iterator, lookahead))
        try:
            while pending:
                current = pending.popleft()
                for item in itertools.islice(iterator, 1):  # keep `lookahead` items in flight behind this one
                    pending.append(pool.submit(function, item))
                yield current.result()
        finally:
            for future in pending:
                future.cancel()


def processed_batches(processor, batches, lookahead=1, num_workers=1, **processor_kwargs):
    """`(batch, processor(batch, return_tensors="pt", **processor_kwargs))` for each batch of images, the next
    `lookahead` batches processed (superpixels computed) in worker threads while the caller uses the current one."""
    processor_kwargs.setdefault("return_tensors", "pt")

    def process(batch):
        return batch, processor(batch, **processor_kwargs)

    return prefetched(batches, process, lookahead=lookahead, num_workers=num_workers)


__all__ = ["prefetched", "processed_batches"]
