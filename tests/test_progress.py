"""Progress as a user reads it (shared/ml/progress.py, `chorus status --follow`): the percent never goes
backwards within a stage; in a log (the output is not a terminal) a line is printed when a step starts and
ends and at least every `interval` seconds while one runs, quiet stages included. The lines are driven by a
fake clock; the heartbeat thread by a short interval."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from shared.ml.progress import ConsoleProgress, JobPercent, StageMeter
from tests.bad_input_apps import served_job_api


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


def _lines(out: io.StringIO) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.strip()]


# -- the percent ----------------------------------------------------------------------------------------
def test_stage_meter_never_goes_backwards() -> None:
    meter = StageMeter()
    seen = []
    # a stage as the affinity stage reports it: meta fine-tune, gradients, estimate (restarting from 0 each),
    # a step reported again after a later one, a total that grows, and a step without a total
    for step, done, total in [
        ("meta", 0, 10),
        ("meta", 5, 10),
        ("meta", 10, 10),
        ("gradients", 0, 4),
        ("gradients", 4, 4),
        ("estimate", 0, 40),
        ("gradients", 1, 4),
        ("estimate", 10, 40),
        ("estimate", 10, 80),
        ("estimate", 80, 80),
        ("finalize", 0, 0),
        ("finalize", 1, 1),
    ]:
        seen.append(meter.update(step, done, total))
    assert seen == sorted(seen), seen
    assert 0.0 == seen[0] < seen[-1] < 1.0
    assert seen[2] == 0.5 and seen[4] == 0.75  # each finished step fills half of what is left


def test_job_percent_is_monotone_over_stages_and_attempts() -> None:
    percent = JobPercent()
    values = [
        percent.update(stage, i, 3, step, done, total)
        for stage, i, step, done, total in [
            ("affinity", 0, "gradients", 0, 10),
            ("affinity", 0, "gradients", 10, 10),
            ("affinity", 0, "estimate", 0, 5),
            ("grouping", 1, "grouping", 0, 1),
            ("grouping", 1, "grouping", 1, 1),
            ("affinity", 0, "gradients", 3, 10),  # a late event of an earlier stage
            ("training", 2, "train", 0, 100),
            ("training", 2, "evaluate", 0, 6),
            ("training", 2, "evaluate", 6, 6),
        ]
    ]
    assert values == sorted(values) and values[-1] < 100.0
    assert values[3] == pytest.approx(100 / 3)  # a new stage starts at its share


# -- lines in a log ---------------------------------------------------------------------------------------
def test_log_lines_at_step_start_end_and_every_interval() -> None:
    clock = FakeClock()
    console, out = _log_console()
    progress = ConsoleProgress(console=console, interval=30, clock=clock, heartbeat=False)
    assert progress.live is False  # a StringIO is no terminal
    progress("gradients", 0, 100, "epoch 1")
    assert len(_lines(out)) == 1 and "gradients 0/100 (0%) epoch 1" in _lines(out)[0]
    for done in range(1, 10):  # frequent calls within the interval print nothing
        clock.now += 2
        progress("gradients", done, 100)
    assert len(_lines(out)) == 1
    clock.now += 12  # 30 s after the last line
    progress("gradients", 10, 100)
    assert len(_lines(out)) == 2 and "gradients 10/100 (10%) epoch 1 [30s]" in _lines(out)[1]
    # a quiet step: no calls for minutes; tick() (what the heartbeat thread calls) prints within the interval
    clock.now += 29
    progress.tick()
    assert len(_lines(out)) == 2
    clock.now += 1
    progress.tick()
    assert len(_lines(out)) == 3 and "gradients 10/100" in _lines(out)[2]
    for _ in range(4):
        clock.now += 30
        progress.tick()
    assert len(_lines(out)) == 7 and "[3m00s]" in _lines(out)[-1]
    progress.log("12:00:00 stage affinity finished")
    clock.now += 29
    progress.tick()  # an event line counts as a line
    assert len(_lines(out)) == 8
    progress("gradients", 100, 100, "done")  # the end of a step is always printed
    assert "gradients 100/100 (100%) done" in _lines(out)[-1]
    clock.now += 300
    progress.tick()  # nothing runs: nothing to repeat
    assert len(_lines(out)) == 9
    progress.close()


def test_idle_text_is_repeated_while_no_step_runs() -> None:
    """Following a job: between steps (a model loading, a queued job) the log still gets a line per interval."""
    clock = FakeClock()
    console, out = _log_console()
    progress = ConsoleProgress(console=console, interval=30, clock=clock, heartbeat=False)
    clock.now += 60
    progress.tick()
    assert _lines(out) == []  # nothing to say yet
    progress.log("10:00:00 stage affinity started (1/3)")
    progress.idle("job-1 running; last event: stage affinity started (1/3)")
    clock.now += 30
    progress.tick()
    assert len(_lines(out)) == 2 and _lines(out)[1].endswith(
        "job-1 running; last event: stage affinity started (1/3) [30s]"
    )
    progress("gradients", 0, 8)
    clock.now += 30
    progress.tick()  # a running step is shown rather than the idle text
    assert "gradients 0/8" in _lines(out)[-1]
    progress("gradients", 8, 8)
    clock.now += 30
    progress.tick()
    assert "job-1 running" in _lines(out)[-1] and "[1m30s]" in _lines(out)[-1]
    progress.idle(None)
    clock.now += 60
    progress.tick()
    assert len(_lines(out)) == 6
    progress.close()


def test_heartbeat_thread_prints_while_a_step_is_quiet() -> None:
    written = threading.Event()

    class Sink(io.StringIO):
        def write(self, text: str) -> int:
            if "[" in text and "still" not in text:
                written.set()
            return super().write(text)

    sink = Sink()
    with ConsoleProgress(console=Console(file=sink, width=200), interval=0.05) as progress:
        progress("train", 1, 10, "epoch 1")
        written.clear()  # the step's first line is printed by the call itself
        assert written.wait(60), "the heartbeat printed nothing while the step was quiet"
        thread = progress._thread
        assert thread is not None and thread.is_alive()
    thread.join(10)
    assert not thread.is_alive()
    assert sum("train 1/10" in line for line in sink.getvalue().splitlines()) >= 2


def test_terminal_detection_looks_at_the_real_stream() -> None:
    assert ConsoleProgress(console=Console(file=io.StringIO(), force_terminal=True)).live is False
    assert ConsoleProgress(console=Console(file=io.StringIO()), live=True).live is True
    with pytest.raises(ValueError, match="interval"):
        ConsoleProgress(interval=0)


def test_live_bars_draw_and_stop() -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with ConsoleProgress(console=console, live=True) as progress:
        progress("train", 0, 4, "epoch 1")
        progress("train", 4, 4, "done")
        assert progress._bars is None  # every step finished: the bars stopped
        progress("evaluate", 1, 2)
    assert "train" in out.getvalue() and "evaluate" in out.getvalue()


# -- `chorus status --follow` in a log ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with served_job_api(tmp_path_factory.mktemp("progress-home"), "progress") as served:
        yield served


def test_follow_prints_progress_lines_into_a_log(api: dict[str, Any]) -> None:
    from services.cli.main import app
    from shared.jobs.runner import run_job

    matrix = [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]]
    params = json.dumps({"affinity": {"tasks": ["cb", "rte", "copa", "wic"], "matrix": matrix}, "groups": 2})
    env = {"CHORUS_API_URL": api["url"], "CHORUS_API_KEY": api["keys"]["submit"], "COLUMNS": "200"}
    r = CliRunner().invoke(app, ["submit", "grouping", "--params", params, "--json"], env=env)
    assert r.exit_code == 0, r.output

    job_id = json.loads(r.stdout)["id"]
    assert run_job(job_id)["outcome"] == "succeeded"
    r = CliRunner().invoke(app, ["status", job_id, "--follow"], env=env)  # CliRunner's stdout is no terminal
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any("grouping 1/1 (100%)" in line and "job " in line for line in lines), r.stdout
    percents = [int(line.split("job ")[1].split("%")[0]) for line in lines if "job " in line and "%" in line]
    assert percents == sorted(percents), percents
    assert any("job succeeded" in line for line in lines) and "succeeded" in lines[-1]


def test_the_job_apis_percent_never_goes_backwards_within_a_stage(tmp_path, monkeypatch):
    """JobProgress (what GET /v1/jobs/{id} shows): a new step or a step restarting from 0 never lowers it."""
    from shared.jobs import progress as job_progress

    monkeypatch.setattr(job_progress, "get_sessionmaker", lambda: None)
    p = job_progress.JobProgress("job-x", "token", object(), "affinity", 1, 3)
    seen = [
        p.snapshot(step, done, total)["percent"]
        for step, done, total in [
            ("meta", 5, 10),
            ("meta", 10, 10),
            ("gradients", 0, 12),
            ("gradients", 6, 12),
            ("meta", 0, 10),
            ("estimate", 1, 4),
            ("gradients", 12, 12),
        ]
    ]
    assert seen == sorted(seen) and 100 / 3 < seen[0] and seen[-1] < 200 / 3
    assert p.snapshot(None, 0, 0, "starting")["percent"] == seen[-1]
