"""The prefetching helper: same results in the same order as a plain loop, work really ahead, errors at their item,
early stops cancel what has not started."""

import threading
import time

import numpy as np
import pytest

from hf_hierseg.prefetch import prefetched, processed_batches


@pytest.mark.parametrize("lookahead,num_workers", [(0, 1), (1, 1), (2, 1), (3, 2), (10, 4)])
def test_results_in_order(lookahead, num_workers):
    rng = np.random.default_rng(lookahead)
    delays = rng.uniform(0, 0.003, size=25)

    def work(item):
        time.sleep(delays[item])  # the later items may finish first with several workers
        return item * item

    assert list(prefetched(range(25), work, lookahead, num_workers)) == [i * i for i in range(25)]


def test_next_item_is_computed_while_the_consumer_works():
    started = []

    def work(item):
        started.append(item)
        return item

    iterator = prefetched(range(5), work, lookahead=1)
    assert next(iterator) == 0
    deadline = time.monotonic() + 5
    while 1 not in started and time.monotonic() < deadline:  # item 1 runs in the worker while we hold item 0
        time.sleep(0.001)
    assert 1 in started and 2 not in started  # one ahead, not more
    assert list(iterator) == [1, 2, 3, 4]


def test_lookahead_zero_runs_in_the_calling_thread():
    threads = set()
    list(prefetched(range(3), lambda item: threads.add(threading.current_thread().name), lookahead=0))
    assert threads == {threading.current_thread().name}


def test_error_raised_at_its_item():
    def work(item):
        if item == 3:
            raise KeyError("bad item 3")
        return item

    seen = []
    with pytest.raises(KeyError, match="bad item 3"):
        for value in prefetched(range(6), work, lookahead=2):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_early_stop_cancels_pending_work():
    gate = threading.Event()
    started = []

    def work(item):
        started.append(item)
        gate.wait(5)
        return item

    iterator = prefetched(range(100), work, lookahead=4, num_workers=1)
    gate.set()
    assert next(iterator) == 0
    iterator.close()  # leaves the pool: not-started items are cancelled, the running one finishes
    assert len(started) <= 6


def test_bad_settings():
    with pytest.raises(ValueError, match="lookahead"):
        list(prefetched([1], str, lookahead=-1))
    with pytest.raises(ValueError, match="num_workers"):
        list(prefetched([1], str, num_workers=0))


def test_processed_batches_equal_the_processor():
    from hf_hierseg import CastImageProcessor
    from hf_hierseg.apps.benchmark_throughput import benchmark_images

    processor = CastImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, num_superpixels=49
    )
    images = benchmark_images(5, 64)
    batches = [images[0:2], images[2:4], images[4:5]]
    results = list(processed_batches(processor, batches, lookahead=1))
    assert [batch for batch, _ in results] == batches
    for batch, processed in results:
        expected = processor(batch, return_tensors="pt")
        assert processed["pixel_values"].equal(expected["pixel_values"])
        assert processed["superpixels"].equal(expected["superpixels"])
