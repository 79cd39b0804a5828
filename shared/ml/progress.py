"""Progress reporting and cooperative cancellation for long-running stages.

Library code calls `progress(step, done, total, message)` between batches. A job runner's callback writes
events to the database and raises `Cancelled` when the job was cancelled, which stops the stage at the next
batch boundary. The command line's callback is `ConsoleProgress` (rich, the one progress library of chorus):
live bars on a terminal; in a log (the output is not a terminal: CI, `make demo > log`) a plain line when a
step starts and ends and at least every `interval` seconds (30) while one runs, however quiet the stage.
`StageMeter` turns the steps one stage reports into a fraction of the stage that never goes backwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

LOG_INTERVAL = 30.0  # seconds: the longest a log goes without a progress line while a step runs


class Cancelled(Exception):
    """Raised from a progress callback to stop a stage cooperatively."""


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None: ...


def silent(stage: str, done: int, total: int, message: str = "") -> None:
    """A progress callback that does nothing."""


class StageMeter:
    """The fraction of one stage that is done, from the steps it reports one after another; never decreases.

    A stage does not announce its steps in advance, so the k-th step to report (k = 0, 1, ...) spans
    [1 - 2^-k, 1 - 2^-(k+1)] of the stage: the first fills the first half, the next a quarter, and so on. A
    step reporting again after a later one started, a step restarting from 0, or a total that grows never
    lowers the value.
    """

    def __init__(self) -> None:
        self._order: dict[str, int] = {}
        self.fraction = 0.0

    def update(self, step: str, done: int, total: int) -> float:
        k = self._order.setdefault(step, len(self._order))
        part = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        self.fraction = max(self.fraction, 1.0 - 0.5**k + part * 0.5 ** (k + 1))
        return self.fraction


class JobPercent:
    """A job's percent (0-100) from progress reports of its stages (stage `index` of `count`): stage by stage
    through a `StageMeter` each, so it never goes backwards."""

    def __init__(self) -> None:
        self._meters: dict[tuple[int, str], StageMeter] = {}
        self.percent = 0.0

    def update(self, stage: str, index: int, count: int, step: str, done: int, total: int) -> float:
        fraction = self._meters.setdefault((index, stage), StageMeter()).update(step, done, total)
        self.percent = max(self.percent, 100.0 * min(index + fraction, count) / max(count, 1))
        return self.percent


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


@dataclass
class _Step:
    done: int
    total: int
    message: str
    started: float
    bar: Any = field(default=None)


class ConsoleProgress:
    """The CLI's progress callback: one rich bar per step on an interactive terminal; otherwise plain lines
    ("12:03:04 gradients 120/400 (30%) epoch 1 [1m05s]") when a step starts, when it ends, and whenever
    `interval` seconds passed since the last line. While a step runs (or an `idle` text is set), a heartbeat
    thread repeats its state every `interval` seconds when nothing else was printed, so a log never goes
    quiet for longer.

    Use it as a context manager (or call `close()`): that stops the bars and the heartbeat. `live` forces
    bars (True) or lines (False); by default bars only when the console writes to a real terminal. `clock`
    (monotonic seconds) and `heartbeat=False` let tests drive the lines with a fake clock and `tick()`.
    """

    def __init__(
        self,
        console: Any = None,
        interval: float = LOG_INTERVAL,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)  # stdout stays for results (tables, --json)
        self.console = console
        self.interval = interval
        self.live = _is_tty(console) if live is None else live
        self.clock = clock
        self._heartbeat = heartbeat and not self.live
        self._steps: dict[str, _Step] = {}
        self._lock = threading.RLock()
        self._last_line = clock()
        self._bars: Any = None  # the rich Progress while a step runs (live mode)
        self._idle: str | None = None
        self._idle_since = self._last_line
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the Progress protocol ---------------------------------------------------------------------------
    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        with self._lock:
            now = self.clock()
            step = self._steps.get(stage)
            new = step is None
            if step is None:
                step = self._steps[stage] = _Step(done, total, message, now)
            step.done, step.total, step.message = done, total, message or step.message
            finished = total > 0 and done >= total
            if self.live:
                self._draw(stage, step, finished)
            elif new or finished or now - self._last_line >= self.interval:
                self._line(stage, step, now)
            if finished:
                del self._steps[stage]
            else:
                self._start_heartbeat()

    def log(self, text: str, style: str | None = None) -> None:
        """Print a line (an event, a warning) above the bars, or between the progress lines."""
        from rich.markup import escape

        with self._lock:
            self.console.print(
                f"[{style}]{escape(text)}[/]" if style else escape(text), highlight=False, soft_wrap=True
            )
            self._last_line = self.clock()

    def idle(self, text: str | None) -> None:
        """What the heartbeat repeats while no step runs (e.g. "job-... running: stage affinity"); None: nothing."""
        with self._lock:
            self._idle, self._idle_since = text, self.clock()
            if text:
                self._start_heartbeat()

    def tick(self) -> None:
        """Print every running step's state again (or the idle text when none runs) if no line was printed for
        `interval` seconds."""
        with self._lock:
            now = self.clock()
            if self.live or now - self._last_line < self.interval:
                return
            for name, step in self._steps.items():
                self._line(name, step, now)
            if not self._steps and self._idle:
                self.console.print(
                    f"{time.strftime('%H:%M:%S')} {self._idle} [{_duration(now - self._idle_since)}]",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
                self._last_line = now

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self._bars is not None:
                self._bars.stop()
                self._bars = None
            self._steps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- output ----------------------------------------------------------------------------------------
    def _line(self, name: str, step: _Step, now: float) -> None:
        pct = f" ({100 * min(step.done / step.total, 1):.0f}%)" if step.total > 0 else ""
        text = f"{time.strftime('%H:%M:%S')} {name} {step.done}/{step.total}{pct}"
        text += (f" {step.message}" if step.message else "") + f" [{_duration(now - step.started)}]"
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        self._last_line = now

    def _draw(self, name: str, step: _Step, finished: bool) -> None:
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._bars is None:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[message]}"),
                console=self.console,
            )
            self._bars.start()
        if step.bar is None:
            step.bar = self._bars.add_task(escape(name), total=step.total or None, message="")
        self._bars.update(step.bar, completed=step.done, total=step.total or None, message=escape(step.message))
        if finished and all(s is step for s in self._steps.values()):
            self._bars.stop()  # the finished bars stay on screen; the next step starts a new set
            self._bars = None

    def _start_heartbeat(self) -> None:
        if self._heartbeat and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="chorus-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while True:
            with self._lock:
                due = self._last_line + self.interval - self.clock()
                wait = max(0.05, due) if (self._steps or self._idle) else self.interval
            if self._stop.wait(wait):
                return
            self.tick()


def _is_tty(console: Any) -> bool:
    """Whether `console` writes to an interactive terminal (not merely one rich was told to colour)."""
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty()) and bool(console.is_interactive)
    except ValueError:  # a closed file
        return False


# The earlier name, still used by bench/ scripts.
TqdmProgress = ConsoleProgress
