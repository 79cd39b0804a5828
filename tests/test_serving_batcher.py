"""The dynamic batcher: concurrent submissions share batches, bounded by size and wait; errors stay per item."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.ml.serving.batcher import DynamicBatcher


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_up_to_the_size_limit():
    seen: list[list[int]] = []
    gate = threading.Event()

    def process(items):
        gate.wait(5)
        seen.append(list(items))
        return [x * 10 for x in items]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=4, max_wait_ms=20)
            tasks = [asyncio.create_task(batcher.submit(i)) for i in range(10)]
            await asyncio.sleep(0.05)
            gate.set()
            out = await asyncio.gather(*tasks)
            await batcher.close()
            return out

    assert _run(main()) == [i * 10 for i in range(10)]
    assert all(len(b) <= 4 for b in seen)
    assert sorted(x for b in seen for x in b) == list(range(10))
    assert len(seen) == 3  # 4 + 4 + 2: the queue filled while the first batch waited


def test_sizes_are_respected_and_an_oversize_item_runs_alone():
    seen: list[list[int]] = []

    def process(items):
        seen.append(list(items))
        return items

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=5, max_wait_ms=30, size=lambda x: x)
            out = await asyncio.gather(*(batcher.submit(x) for x in [2, 2, 2, 9, 1]))
            await batcher.close()
            return out

    assert _run(main()) == [2, 2, 2, 9, 1]
    for batch in seen:
        assert sum(batch) <= 5 or batch == [9]
    assert [9] in seen


def test_a_lone_request_waits_at_most_max_wait():
    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(lambda items: items, pool, max_batch=64, max_wait_ms=10)
            start = time.perf_counter()
            result = await batcher.submit("x")
            elapsed = time.perf_counter() - start
            await batcher.close()
            return result, elapsed

    result, elapsed = _run(main())
    assert result == "x" and elapsed < 2.0  # generous: shared CI machines


def test_errors_fail_only_their_items_or_the_whole_batch():
    def process(items):
        if "boom" in items:
            raise RuntimeError("model failed")
        return [ValueError(f"bad {x}") if x == "bad" else x.upper() for x in items]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=8, max_wait_ms=20)
            mixed = await asyncio.gather(batcher.submit("ok"), batcher.submit("bad"), return_exceptions=True)
            failed = await asyncio.gather(batcher.submit("boom"), return_exceptions=True)
            after = await batcher.submit("fine")  # the batcher keeps working
            await batcher.close()
            return mixed, failed, after

    mixed, failed, after = _run(main())
    assert mixed[0] == "OK" and isinstance(mixed[1], ValueError)
    assert isinstance(failed[0], RuntimeError)
    assert after == "FINE"


def test_cancelled_requests_are_skipped():
    seen: list[list[str]] = []
    gate = threading.Event()

    def process(items):
        gate.wait(5)
        seen.append(list(items))
        return items

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=1, max_wait_ms=0)
            first = asyncio.create_task(batcher.submit("first"))
            await asyncio.sleep(0.02)
            doomed = asyncio.create_task(batcher.submit("doomed"))
            kept = asyncio.create_task(batcher.submit("kept"))
            await asyncio.sleep(0.02)
            doomed.cancel()
            gate.set()
            out = await asyncio.gather(first, kept)
            with pytest.raises(asyncio.CancelledError):
                await doomed
            await batcher.close()
            return out

    assert _run(main()) == ["first", "kept"]
    assert ["doomed"] not in seen


def test_works_across_event_loops():
    with ThreadPoolExecutor(1) as pool:
        batcher = DynamicBatcher(lambda items: [i + 1 for i in items], pool, max_batch=4, max_wait_ms=1)
        assert asyncio.run(batcher.submit(1)) == 2
        assert asyncio.run(batcher.submit(2)) == 3  # a new loop (e.g. a new test client) restarts the collector
