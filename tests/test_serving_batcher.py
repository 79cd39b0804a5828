"""The dynamic batcher: concurrent submissions share batches, bounded by size and wait; errors stay per item."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

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


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: when nothing is ready, time jumps to the next timer instead of sleeping,
    so waits are exact and take no wall time (the batcher reads time through loop.time())."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        select = self._selector.select

        def jump(timeout: float | None = None):  # type: ignore[no-untyped-def]
            events = select(0)
            if not events and timeout:
                self.now += timeout
            return events

        self._selector.select = jump  # type: ignore[method-assign]

    def time(self) -> float:
        return self.now


class _InlineExecutor(Executor):
    """Runs `process` at once in the loop's thread (no wall-clock work in flight while virtual time moves)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _virtual(coro_fn):  # type: ignore[no-untyped-def]
    loop = _VirtualClockLoop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.close()


@pytest.mark.parametrize("max_wait_ms", [10, 2_500])
def test_a_lone_request_waits_exactly_max_wait(max_wait_ms):
    """On a virtual clock: a lone request is sent max_wait_ms after it arrived, not before and not later; a
    request arriving within that window joins its batch, one arriving after it starts the next batch."""
    seen: list[tuple[float, list[str]]] = []

    async def main(loop):  # type: ignore[no-untyped-def]
        def process(items):  # type: ignore[no-untyped-def]
            seen.append((loop.time(), list(items)))
            return [x.upper() for x in items]

        batcher = DynamicBatcher(process, _InlineExecutor(), max_batch=64, max_wait_ms=max_wait_ms)
        wait = max_wait_ms / 1000
        lone = await asyncio.wait_for(batcher.submit("x"), timeout=1000 * wait)
        sent_at = seen[-1][0]
        start = loop.time()
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.4 * wait)
        second = asyncio.ensure_future(batcher.submit("b"))  # inside a's window: same batch
        both = await asyncio.wait_for(asyncio.gather(first, second), timeout=1000 * wait)
        await asyncio.sleep(0.5 * wait)
        late = await asyncio.wait_for(batcher.submit("c"), timeout=1000 * wait)
        await batcher.close()
        return lone, sent_at, start, both, late

    lone, sent_at, start, both, late = _virtual(main)
    wait = max_wait_ms / 1000
    assert lone == "X" and both == ["A", "B"] and late == "C"
    assert [batch for _, batch in seen] == [["x"], ["a", "b"], ["c"]]
    assert sent_at == pytest.approx(wait, abs=1e-9)  # the lone request arrived at time 0
    assert seen[1][0] == pytest.approx(start + wait, abs=1e-9)  # a's window, not b's
    assert seen[2][0] == pytest.approx(start + 1.5 * wait + wait, abs=1e-9)


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
