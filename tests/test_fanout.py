"""The shard-claim table and the fan-out loops on SQLite (no queue, no model): shard rows are created once,
one claimant wins each shard, expired or orphaned claims are taken over, attempts are bounded, a job's
own worker finishes a phase alone, and a helper does nothing for a finished job."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from shared.db.models import Job, JobEvent, JobShard, new_id, utcnow
from shared.db.session import get_sessionmaker, migrate
from shared.jobs import fanout
from shared.jobs.config import ServiceSettings
from shared.ml.progress import Cancelled
from shared.ml.sharding import Phase, split_ranges


def record_shard(
    args: dict[str, Any], workdir: Path, progress: Any, start: int, end: int, cache: dict[str, Any]
) -> dict[str, Any]:
    """A shard function for these tests: writes one file per item, fails where asked; calls go to the cache."""
    if start in args.get("fail_at", []):
        raise ValueError(f"shard at {start} fails")
    for i in range(start, end):
        progress("items", i - start + 1, end - start)
        (workdir / f"item-{i}").write_text(str(i * i))
    cache.setdefault("calls", []).append((args.get("tag", ""), start, end))
    return {"items": end - start}


def record_prepare(args: dict[str, Any], workdir: Path, cache: dict[str, Any]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prepared").write_text("1")


def stolen_shard(
    args: dict[str, Any], workdir: Path, progress: Any, start: int, end: int, cache: dict[str, Any]
) -> dict[str, Any]:
    """A shard whose claim another worker takes over while it runs (as after an expired lease)."""
    import time

    from sqlalchemy import create_engine

    with create_engine(args["url"]).begin() as conn:
        conn.execute(
            update(JobShard)
            .where(JobShard.job_id == args["job_id"], JobShard.index == start)
            .values(
                attempts=JobShard.attempts + 1, claimed_by="thief:1", lease_expires_at=utcnow() + timedelta(seconds=60)
            )
        )
    for step in range(100):
        progress("items", step, 100)  # raises ClaimLost once the heartbeat saw the takeover
        time.sleep(0.05)
    raise AssertionError("the lost claim was not noticed")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'fanout.db'}"
    migrate(url)
    monkeypatch.setattr(fanout, "SHARD_FN_PREFIX", "tests.")
    return get_sessionmaker(url)


@pytest.fixture
def settings(tmp_path: Path) -> ServiceSettings:
    return ServiceSettings(lease_seconds=30, max_attempts=3, work_dir=tmp_path / "work", fanout_shards=4)


def _job(maker, status: str = "running") -> str:  # type: ignore[no-untyped-def]
    job_id = new_id("job")
    with maker() as session:
        session.add(Job(id=job_id, type="affinity", status=status, owner="t", params={}, progress={}, attempt=1))
        session.commit()
    return job_id


SPEC = {"fn": "tests.test_fanout:record_shard", "args": {}, "label": "items", "unit": "items"}


def _shards(maker, job_id: str) -> list[JobShard]:  # type: ignore[no-untyped-def]
    with maker() as session:
        rows = list(session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.index)))
        session.expunge_all()
    return rows


def test_split_ranges_are_contiguous_and_aligned() -> None:
    assert split_ranges(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert split_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert split_ranges(10, 3, align=4) == [(0, 4), (4, 8), (8, 10)]
    assert split_ranges(10, 2, align=8) == [(0, 8), (8, 10)]
    assert split_ranges(5, 1) == [(0, 5)] and split_ranges(0, 4) == []
    for size, shards, align in [(97, 7, 3), (12, 5, 1), (7, 7, 2)]:
        ranges = split_ranges(size, shards, align)
        assert ranges[0][0] == 0 and ranges[-1][1] == size and len(ranges) <= shards
        assert all(a < b and a % align == 0 for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_shard_rows_are_created_once(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    with db() as session:
        assert fanout.ensure_shards(session, job_id, "p", [(0, 5), (5, 10)], SPEC) == 2
        # a second call (a resumed job, or another cut) keeps the existing rows
        assert fanout.ensure_shards(session, job_id, "p", [(0, 3), (3, 6), (6, 10)], SPEC) == 2
    # concurrent creators: still one set of rows
    other = _job(db)
    barrier = threading.Barrier(6)

    def create() -> None:
        with db() as session:
            barrier.wait()
            fanout.ensure_shards(session, other, "p", split_ranges(12, 4), SPEC)

    threads = [threading.Thread(target=create) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    rows = _shards(db, other)
    assert [(r.index, r.start, r.end, r.status, r.attempts) for r in rows] == [
        (0, 0, 3, "pending", 0),
        (1, 3, 6, "pending", 0),
        (2, 6, 9, "pending", 0),
        (3, 9, 12, "pending", 0),
    ]


def test_each_shard_is_claimed_exactly_once(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    with db() as session:
        fanout.ensure_shards(session, job_id, "p", split_ranges(40, 10), SPEC)
    claims: list[fanout.ShardClaim] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def claimer(i: int) -> None:
        barrier.wait()
        while True:
            with db() as session:
                claim = fanout.claim_shard(session, job_id, "p", f"host:{1000 + i}", 30, 3)
            if claim is None:
                return
            with lock:
                claims.append(claim)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(c.index for c in claims) == list(range(10))
    assert all(c.attempt == 1 and c.total == 10 for c in claims)
    rows = _shards(db, job_id)
    assert all(r.status == "running" and r.attempts == 1 for r in rows)
    assert {r.index: r.claimed_by for r in rows} == {c.index: c.worker for c in claims}
    with db() as session:
        assert fanout.claim_shard(session, job_id, "p", "host:2", 30, 3) is None  # leases still valid
        assert not fanout.has_claimable(session, job_id, "p", 3)


def test_expired_or_orphaned_claims_are_taken_over(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    with db() as session:
        fanout.ensure_shards(session, job_id, "p", [(0, 1), (1, 2)], SPEC)
        first = fanout.claim_shard(session, job_id, "p", "host-a:1", 30, 3)
        second = fanout.claim_shard(session, job_id, "p", "host-a:2", 30, 3)
    assert first and second and (first.index, second.index) == (0, 1)
    # shard 0's worker stopped renewing: its lease expires, another worker takes it over
    with db() as session:
        session.execute(
            update(JobShard).where(JobShard.id == first.id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
        assert fanout.has_claimable(session, job_id, "p", 3)
        again = fanout.claim_shard(session, job_id, "p", "host-b:7", 30, 3)
    assert again and again.index == 0 and again.attempt == 2 and again.worker == "host-b:7"
    with db() as session:  # the old claimant can neither renew nor finish it any more
        assert not fanout.renew_shard(session, first, 30)
        assert not fanout.complete_shard(session, first, {})
        assert fanout.renew_shard(session, again, 30)
        assert fanout.complete_shard(session, again, {"ok": 1})
    # shard 1's worker died on this host (its pid is gone): claimable at once, lease or not
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with db() as session:
        session.execute(
            update(JobShard).where(JobShard.id == second.id).values(claimed_by=f"{fanout.state.HOSTNAME}:{dead.pid}")
        )
        session.commit()
        took = fanout.claim_shard(session, job_id, "p", "host-b:7", 30, 3)
    assert took and took.index == 1 and took.attempt == 2
    rows = _shards(db, job_id)
    assert [(r.status, r.claimed_by, r.attempts) for r in rows] == [("done", "host-b:7", 2), ("running", "host-b:7", 2)]
    with db() as session:
        events = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert events == ["items: shard 1/2 done by host-b:7"]


def test_attempts_are_bounded(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    with db() as session:
        fanout.ensure_shards(session, job_id, "p", [(0, 1)], SPEC)
        for attempt in (1, 2):
            claim = fanout.claim_shard(session, job_id, "p", f"w:{attempt}", 30, 2)
            assert claim and claim.attempt == attempt
            fanout.release_shard(session, claim, "boom")
        assert fanout.claim_shard(session, job_id, "p", "w:3", 30, 2) is None
        failed = fanout.fail_exhausted(session, job_id, "p", 2)
    assert failed == [{"index": 0, "start": 0, "end": 1, "attempts": 2, "error": "boom"}]
    assert [r.status for r in _shards(db, job_id)] == ["failed"]


@pytest.fixture
def strict_db(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A database with the production allow-list of shard functions (`db` widens it to this module's)."""
    url = f"sqlite:///{tmp_path / 'strict.db'}"
    migrate(url)
    return get_sessionmaker(url)


def test_shard_functions_outside_the_ml_core_are_refused(strict_db, settings, caplog) -> None:  # type: ignore[no-untyped-def]
    """A shard spec comes from the database: only functions of the ML core run; anything else is refused before it
    is imported, the phase fails with that error and nothing is written."""
    from shared.ml.affinity import stage
    from shared.ml.training import shards

    assert fanout.SHARD_FN_PREFIX == "shared.ml."
    for ref in (
        "os:system",
        "subprocess:check_call",
        "tests.test_fanout:record_shard",
        "shared.mlx.evil:f",
        "shared.jobs.fanout:run_claim",
        "shared.ml",
        "",
        None,
        3,
    ):
        with pytest.raises(ValueError, match="is not a function of the ML core"):
            fanout.shard_function(ref)  # type: ignore[arg-type]
    assert fanout.shard_function("shared.ml.affinity.stage:affinity_shard") is stage.affinity_shard
    assert fanout.shard_function("shared.ml.training.shards:training_prepare") is shards.training_prepare
    job_id = _job(strict_db)
    workdir = settings.workdir_root / job_id
    sharder = fanout.JobSharder(job_id, settings, None, maker=strict_db)
    with pytest.raises(ValueError, match="'tests.test_fanout:record_shard' is not a function of the ML core"):
        sharder.run(Phase("items", "items", 4, SPEC["fn"], {}), workdir, lambda *a, **k: None, {})
    assert not list(workdir.glob("item-*")) and all(r.status != "done" for r in _shards(strict_db, job_id))
    # a helper refuses a foreign `prepare` hook too, before it claims a shard
    other = _job(strict_db)
    phase = Phase("items", "items", 2, "shared.ml.affinity.stage:affinity_shard", {}, prepare="os:getcwd")
    with strict_db() as session:
        fanout.ensure_shards(
            session,
            other,
            "items",
            [(0, 1), (1, 2)],
            {"fn": phase.fn, "prepare": phase.prepare, "args": {}, "label": "items", "unit": "items"},
        )
    with caplog.at_level("ERROR", logger=fanout.log.name):
        outcome = fanout.run_helper(other, "items", settings, strict_db)
    assert outcome["outcome"] == "error" and all(r.attempts == 0 for r in _shards(strict_db, other)), outcome
    assert "'os:getcwd' is not a function of the ML core" in caplog.text


def test_the_jobs_own_worker_finishes_a_phase_alone(db, settings) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    sent: list[tuple[str, str, int]] = []
    sharder = fanout.JobSharder(job_id, settings, lambda j, p, n: sent.append((j, p, n)), maker=db)
    progress_calls: list[tuple[str, int, int]] = []
    cache: dict[str, Any] = {}
    phase = Phase("items", "items", 10, SPEC["fn"], {"tag": "a"}, unit="items", align=2)
    sharder.run(phase, settings.workdir_root / job_id, lambda s, d, t, m="": progress_calls.append((s, d, t)), cache)
    assert sent == [(job_id, "items", 3)]  # helpers asked for; none came: the parent did every shard
    assert sorted(cache["calls"]) == [("a", 0, 2), ("a", 2, 4), ("a", 4, 6), ("a", 6, 10)]
    assert sorted(p.name for p in (settings.workdir_root / job_id).iterdir()) == sorted(f"item-{i}" for i in range(10))
    assert ("items shards", 4, 4) in progress_calls
    rows = _shards(db, job_id)
    assert all(r.status == "done" and r.attempts == 1 and r.claimed_by == fanout.worker_id() for r in rows)
    # a resumed stage finds the phase done: nothing runs again, no helper is asked for
    sent.clear()
    again: dict[str, Any] = {}
    sharder.run(phase, settings.workdir_root / job_id, lambda *a, **k: None, again)
    assert again == {} and sent == []
    with db() as session:
        messages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert [m for m in messages if " done by " in m] == [
        f"items: shard {k}/4 done by {fanout.worker_id()}" for k in (1, 2, 3, 4)
    ]
    assert messages[-1].startswith("items: all 4 shards done (4 by ")


def test_a_failing_shard_fails_the_phase_after_its_attempts(db, settings) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    sharder = fanout.JobSharder(job_id, settings, None, maker=db)
    phase = Phase("items", "items", 4, SPEC["fn"], {"fail_at": [2]})
    with pytest.raises(ValueError, match="shard at 2 fails"):  # the parent sees the shard's own error
        sharder.run(phase, settings.workdir_root / job_id, lambda *a, **k: None, {})
    rows = _shards(db, job_id)
    assert [(r.status, r.attempts) for r in rows][2] == ("pending", 1) and "shard at 2 fails" in (rows[2].error or "")
    # a helper that hits the same error gives the shard back and returns; after max_attempts the phase fails
    for _ in range(2):
        assert fanout.run_helper(job_id, "items", settings, db)["outcome"] == "error"
    with pytest.raises(RuntimeError, match=r"shard 2 .* failed after 3 attempt\(s\): ValueError: shard at 2 fails"):
        sharder.wait("items", "items", lambda *a, **k: None, {})


def test_a_helper_does_nothing_for_a_finished_job_and_stops_on_cancel(db, settings) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db, status="succeeded")
    with db() as session:
        fanout.ensure_shards(session, job_id, "p", [(0, 1), (1, 2)], SPEC)
    assert fanout.run_helper(job_id, "p", settings, db)["outcome"] == "nothing to do"
    assert fanout.run_helper("job-missing", "p", settings, db)["outcome"] == "nothing to do"
    assert not (settings.workdir_root / job_id).exists() and all(r.status == "pending" for r in _shards(db, job_id))
    # a running job: the helper works until nothing is claimable
    live = _job(db)
    with db() as session:
        fanout.ensure_shards(
            session, live, "p", [(0, 1), (1, 2), (2, 3)], {**SPEC, "prepare": "tests.test_fanout:record_prepare"}
        )
    out = fanout.run_helper(live, "p", settings, db)
    assert out["outcome"] == "done" and out["shards"] == [0, 1, 2]
    assert (settings.workdir_root / live / "prepared").exists()
    assert fanout.run_helper(live, "p", settings, db)["outcome"] == "nothing to do"  # a duplicate delivery
    # cancelled while a parent waits: check() stops it
    job3 = _job(db)
    with db() as session:
        fanout.ensure_shards(session, job3, "p", [(0, 1)], SPEC)
        fanout.claim_shard(session, job3, "p", "elsewhere:1", 30, 3)  # held by a live helper elsewhere

    def check() -> None:
        raise Cancelled("job cancelled")

    with pytest.raises(Cancelled):
        fanout.JobSharder(job3, settings, None, check, maker=db).wait("p", "p", lambda *a, **k: None, {})


def test_a_worker_that_lost_its_claim_drops_the_shard_and_goes_on(db, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(db)
    spec = {
        **SPEC,
        "fn": "tests.test_fanout:stolen_shard",
        "args": {"url": f"sqlite:///{tmp_path / 'fanout.db'}", "job_id": job_id},
    }
    with db() as session:
        fanout.ensure_shards(session, job_id, "p", [(0, 1)], spec)
    quick = settings.model_copy(update={"lease_seconds": 0.3})
    done = fanout.work_on_phase(job_id, "p", lambda *a, **k: None, {}, settings=quick, maker=db, worker="me:1")
    assert done == []  # no exception: the shard belongs to the other worker now
    [row] = _shards(db, job_id)
    assert (row.status, row.claimed_by, row.attempts) == ("running", "thief:1", 2)
