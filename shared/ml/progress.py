"""Progress reporting and cooperative cancellation for long-running stages.

Library code calls `progress(stage, done, total, message)` between batches. A job runner's callback
writes events to the database and raises `Cancelled` when the job was cancelled, which stops the
stage at the next batch boundary; the CLI's callback draws a progress bar.
"""

from __future__ import annotations

from typing import Protocol


class Cancelled(Exception):
    """Raised from a progress callback to stop a stage cooperatively."""


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None: ...


def silent(stage: str, done: int, total: int, message: str = "") -> None:
    """A progress callback that does nothing."""


class TqdmProgress:
    """Draws one tqdm bar per stage name (used by the CLI)."""

    def __init__(self) -> None:
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="it", leave=True, dynamic_ncols=True)
        bar.total = total  # type: ignore[attr-defined]
        bar.n = done  # type: ignore[attr-defined]
        if message:
            bar.set_postfix_str(message, refresh=False)  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]
        if done >= total:
            bar.close()  # type: ignore[attr-defined]
            self._bars.pop(stage, None)
