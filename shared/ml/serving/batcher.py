"""Dynamic batching of concurrent requests (asyncio front, one model worker thread behind it).

`submit(item)` queues an item and awaits its result. A collector task takes the first waiting item,
then keeps adding items until their total size reaches `max_batch` or `max_wait_ms` has passed since
that first item, and runs `process(items)` in the worker executor (ONE thread: the model is never used
concurrently). While the model is busy new requests queue up and form the next batch, so under load
batches fill without waiting and a lone request waits at most `max_wait_ms`.

`process` returns one result per item, in order; an Exception instance in that list fails only its
item, an exception raised by `process` fails the whole batch. An item larger than `max_batch` runs
alone (the process function is expected to split it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    item: Any
    size: int
    future: asyncio.Future[Any]
    queued_at: float


class DynamicBatcher:
    def __init__(
        self,
        process: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        size: Callable[[Any], int] = lambda item: 1,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.process = process
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.size = size
        self.on_batch = on_batch  # (requests, total size, seconds in process)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Entry] | None = None
        self._task: asyncio.Task[None] | None = None
        self._carry: _Entry | None = None
        self.batches = 0

    def _ensure_started(self) -> asyncio.Queue[_Entry]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # First use, or a new event loop (e.g. a test client's): start a collector on this loop.
            self._loop = loop
            self._queue = asyncio.Queue()
            self._carry = None
            self._task = loop.create_task(self._collect(), name="chorus-batcher")
        assert self._queue is not None
        return self._queue

    @property
    def pending(self) -> int:
        return (self._queue.qsize() if self._queue is not None else 0) + (1 if self._carry is not None else 0)

    async def submit(self, item: Any) -> Any:
        queue = self._ensure_started()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Entry(item, max(1, int(self.size(item))), future, time.perf_counter()))
        return await future

    async def _next(self, timeout: float | None) -> _Entry | None:
        assert self._queue is not None
        if self._carry is not None:
            entry, self._carry = self._carry, None
            return entry
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout is not None and timeout <= 0:
                return None
        try:
            if timeout is None:
                return await self._queue.get()
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first is None or first.future.done():
                continue
            batch, total = [first], first.size
            deadline = loop.time() + self.max_wait
            while total < self.max_batch:
                entry = await self._next(deadline - loop.time())
                if entry is None:
                    break
                if entry.future.done():  # cancelled by its caller while queued
                    continue
                if total + entry.size > self.max_batch:
                    self._carry = entry
                    break
                batch.append(entry)
                total += entry.size
            await self._run(batch, total)

    async def _run(self, batch: list[_Entry], total: int) -> None:
        live = [e for e in batch if not e.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.process, [e.item for e in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch process returned {len(results)} results for {len(live)} items")
        except Exception as exc:  # the whole batch failed
            for e in live:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        finally:
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(live), total, time.perf_counter() - start)
        for e, result in zip(live, results, strict=True):
            if e.future.done():
                continue
            if isinstance(result, BaseException):
                e.future.set_exception(result)
            else:
                e.future.set_result(result)

    async def close(self) -> None:
        """Stop the collector; queued requests fail with CancelledError."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._queue is not None:
            while not self._queue.empty():
                entry = self._queue.get_nowait()
                if not entry.future.done():
                    entry.future.cancel()
        if self._carry is not None and not self._carry.future.done():
            self._carry.future.cancel()
        self._carry = None
