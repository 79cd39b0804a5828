"""Running one job: claim it, run its stages in order (skipping finished ones), ingest each stage's
artifacts in the same transaction that marks the stage finished, and end the job in one terminal state.

This is queue-agnostic: the Celery task calls `run_job(job_id, dispatch=...)`; so can a test or a debugger.

Fan-out: with settings.fanout_shards > 1 every stage runs with a shared.jobs.fanout.JobSharder installed
(shared.ml.sharding.use_sharder), which shardable stages (the affinity stage, also inside the pipeline)
hand their gradient passes and subset estimations to. The sharder records the shards in the database,
asks for helpers through the injected `dispatch(job_id, phase, helpers)` (the Celery worker sends a
group of chorus.run_shards tasks; without it this worker does every shard), works on shards itself and
returns once all are done. Helpers write into the shared job workdir; resume works per stage as before,
and per shard within a stage.

What a stage returns is checked right away: StageResult.from_summary (shared.jobs.results) locates and types its
artifacts, and a return that is not a valid one fails the job as `stage_failed`; ingest then records the
StageResult's artifacts by their declared kinds.

Errors: `stage_error` turns what a stage raised into the job's error through shared.errors.classify. Params
were validated at submit, so inside a stage only a ChorusError that says so (InvalidParams, BadInput) is the
user's fault; any other exception, a plain ValueError included, fails the job as `stage_failed`.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from shared.db.models import Artifact, Job, JobStage, JobStatus, StageStatus, utcnow
from shared.db.session import UNAVAILABLE, get_sessionmaker
from shared.errors import BadInput, ChorusError, Infrastructure, InvalidParams, StageFailed, classify
from shared.files import json_safe
from shared.jobs import state
from shared.jobs.config import ServiceSettings, get_service_settings
from shared.jobs.fanout import Dispatch, JobSharder
from shared.jobs.ingest import ingest_result, merge_stage_artifacts
from shared.jobs.progress import JobProgress, Lease
from shared.jobs.registry import JOB_TYPES, JobType, JobTypeUnavailable, StageFn, load_ref
from shared.jobs.results import StageResult
from shared.jobs.workspace import Workspace
from shared.ml.progress import Cancelled
from shared.ml.sharding import use_sharder
from shared.storage import ArtifactStore, folder_digest, folder_manifest, sha256_file

log = logging.getLogger("chorus.jobs")

# Exceptions raised by a queue's soft time limit (matched by name: this module imports no queue).
TIMEOUT_EXCEPTIONS = ("SoftTimeLimitExceeded", "TimeoutError")


def validation_error(exc: ValidationError, prefix: str = "params") -> dict[str, Any]:
    """The job error object for a pydantic error: the first failing field, dotted (e.g. params.tasks)."""
    errors = exc.errors()
    first: Mapping[str, Any] = {"loc": (), "msg": str(exc)}
    if errors:
        first = errors[0]
    loc = ".".join(str(p) for p in (prefix, *first.get("loc", ())) if p != "")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return state.error_obj(InvalidParams.code, f"{loc}: {msg}", loc)


def stage_error(name: str, exc: BaseException) -> tuple[dict[str, Any], bool]:
    """The job error object for an exception a stage raised, and whether it is ours (keep the traceback)."""
    family = classify(exc, in_stage=True)
    param = exc.param if isinstance(exc, ChorusError) else None
    if family in (InvalidParams, BadInput):
        return state.error_obj(family.code, str(exc) or type(exc).__name__, param), False
    what = str(exc) if isinstance(exc, ChorusError) else f"{type(exc).__name__}: {exc}"
    return state.error_obj(family.code, f"stage {name}: {what}", param), True


class _Stop(Exception):
    """Internal: the job reached a terminal state (or lost its lease); unwind quietly."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class JobRunner:
    def __init__(
        self,
        job_id: str,
        *,
        token: str | None = None,
        settings: ServiceSettings | None = None,
        store: ArtifactStore | None = None,
        hard_stop: Callable[[], None] | None = None,
        dispatch: Dispatch | None = None,
    ) -> None:
        self.job_id = job_id
        self.token = token or state.make_token()
        self.settings = settings or get_service_settings()
        self.store = store or ArtifactStore()
        self.hard_stop = hard_stop
        self.dispatch = dispatch  # asks the queue for fan-out helpers (see shared.jobs.fanout)
        self.maker = get_sessionmaker()
        self.lease: Lease | None = None
        self.job_type: JobType | None = None  # with its validated params, once _execute has them
        self.params: BaseModel | None = None
        self.inputs: list[_Input] = []  # files params name, checked before the first stage runs
        self._stage_started = 0.0  # time.monotonic() when the current stage started

    # -- entry point --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with self.maker() as session:
            claim = state.claim(
                session, self.job_id, self.token, self.settings.lease_seconds, self.settings.max_attempts
            )
        if claim.outcome != "claimed":
            log.info("job %s not run: %s %s", self.job_id, claim.outcome, claim.status)
            return {"job_id": self.job_id, "outcome": claim.outcome, "status": claim.status}
        self.claim = claim
        self.lease = Lease(
            self.job_id, self.token, self.settings.lease_seconds, self.settings.cancel_grace_seconds, self.hard_stop
        ).start()
        try:
            outcome = self._timed_out_outside_stage()
        except _Stop as stop:
            outcome = stop.outcome
        finally:
            self.lease.stop()
        log.info("job %s: %s", self.job_id, outcome)
        return {"job_id": self.job_id, "outcome": outcome}

    def _timed_out_outside_stage(self) -> str:
        """_execute, where a time limit that fires outside a stage (e.g. while its module is imported) fails
        the job as `timeout` instead of escaping and leaving it running for the reaper to retry."""
        try:
            return self._execute()
        except _Stop:
            raise
        except Exception as exc:
            if type(exc).__name__ not in TIMEOUT_EXCEPTIONS:
                raise
            self._fail(state.error_obj("timeout", "the job exceeded its time limit before its stage started"))
            raise  # unreachable: _fail raises _Stop

    # -- helpers ------------------------------------------------------------------------------------
    def _fail(self, error: dict[str, Any], stage: str | None = None, detail: str | None = None) -> None:
        with self.maker() as session:
            if stage is not None:
                row = self._stage_row(session, stage)
                if row is not None and row.status == StageStatus.RUNNING:
                    row.status, row.error, row.finished_at = StageStatus.FAILED, error, utcnow()
            if state.finish(session, self.job_id, self.token, JobStatus.FAILED, error=error):
                data = {"error": error, **({"traceback": detail[-8000:]} if detail else {})}
                state.add_event(session, self.job_id, f"failed: {error['message']}", "error", data)
                session.commit()
                raise _Stop("failed")
            session.rollback()
        raise _Stop(self._why_not_mine())

    def _why_not_mine(self) -> str:
        with self.maker() as session:
            verdict = state.observe(session, self.job_id, self.token)
            if verdict == "cancelled":
                state.release(session, self.job_id, self.token)
                session.commit()
        return "cancelled" if verdict == "cancelled" else "lease_lost"

    def _stage_row(self, session: Any, name: str) -> JobStage | None:
        return session.scalars(
            select(JobStage).where(JobStage.job_id == self.job_id, JobStage.name == name)
        ).one_or_none()

    def _workdir(self) -> Path:
        """One working directory per job, shared by its stages (they read each other's files) and kept
        between attempts on this machine so a stage can resume from its own partial outputs."""
        path = self.settings.workdir_root / self.job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _materialize(self, session: Any, stage: str) -> dict[str, Path]:
        """A finished stage's artifacts as later stages expect them: at the path the stage wrote them in
        the workdir (copied back from the store when this machine does not have them), by logical name.
        A stored object that is missing or corrupt fails the job (see _fetch)."""
        workdir = self._workdir().resolve()
        out: dict[str, Path] = {}
        for art in session.scalars(select(Artifact).where(Artifact.job_id == self.job_id, Artifact.stage == stage)):
            rel = (art.meta or {}).get("relpath") or art.name
            target = (workdir / rel).resolve()
            if not target.is_relative_to(workdir):
                continue
            if not target.exists():
                try:
                    self._fetch(art, target, f"artifact {art.name!r} of stage {stage}")
                except ChorusError as exc:
                    self._fail(state.error_obj(classify(exc).code, str(exc)))
            out[art.name] = target
            out[f"{stage}/{art.name}"] = target
        return out

    def _fetch(self, art: Artifact, target: Path, what: str) -> None:
        """Copy a stored artifact to `target`, checking it still has the sha256 it was recorded with. A missing
        or corrupt object is StageFailed (never the user's fault), a store that cannot be read Infrastructure;
        either leaves no copy."""
        try:
            _copy_object(self.store.resolve(art.path), target)
            actual = folder_digest(folder_manifest(target)) if art.kind == "folder" else sha256_file(target)
        except (FileNotFoundError, ValueError) as exc:
            _remove(target)
            raise StageFailed(f"{what} is missing from the artifact store ({type(exc).__name__})") from exc
        except OSError as exc:
            _remove(target)
            raise Infrastructure(f"{what} cannot be read from the artifact store ({type(exc).__name__})") from exc
        if actual != art.sha256:
            _remove(target)
            raise StageFailed(f"{what} is corrupt in the artifact store: its sha256 is not the recorded one")

    def _resolve_artifact_params(self, job_type: JobType, params: dict[str, Any]) -> dict[str, Any]:
        """Replace artifact ids in params (e.g. grouping.affinity) by a copy in the workdir (remembered in
        self.inputs for _check_inputs)."""
        params = dict(params)
        for field, filename in job_type.artifact_params:
            ref = params.get(field)
            if not isinstance(ref, str) or not ref.startswith("art-"):
                continue
            with self.maker() as session:
                art = session.get(Artifact, ref)
                if art is None or art.owner != self.claim.owner:
                    self._fail(
                        state.error_obj(InvalidParams.code, f"params.{field}: no artifact {ref!r}", f"params.{field}")
                    )
                assert art is not None
                session.expunge(art)
            target = self._workdir() / "inputs" / filename
            if target.exists() or target.is_symlink():
                target.unlink()
            self._fetch(art, target, f"params.{field}: artifact {ref!r}")
            self.inputs.append(_Input(field, ref, target, (art.meta or {}).get("source") == "inline"))
            params[field] = str(target)
        return params

    def _check_inputs(self) -> None:
        """Check the files params name against the params (JobType.artifact_checks), once, before the first
        stage runs: a problem is the user's (InvalidParams for an object the request gave inline, BadInput
        for an artifact it named)."""
        if not self.inputs:
            return
        assert self.job_type is not None
        checks = dict(self.job_type.artifact_checks)
        inputs, self.inputs = self.inputs, []
        for item in inputs:
            if item.field not in checks:
                continue
            try:
                load_ref(checks[item.field])(self.params, item.path)
            except ValueError as exc:
                message = str(exc).replace(str(item.path), item.ref)  # no server paths in a job's error
                family = InvalidParams if item.inline else BadInput
                raise family(f"params.{item.field}: {message}", param=f"params.{item.field}") from exc

    # -- the job ------------------------------------------------------------------------------------
    def _execute(self) -> str:
        assert self.lease is not None
        job_type = JOB_TYPES.get(self.claim.type)
        if job_type is None:
            self._fail(state.error_obj("unknown_job_type", f"unknown job type {self.claim.type!r}", "type"))
        assert job_type is not None
        try:
            raw = self._resolve_artifact_params(job_type, self.claim.params or {})
            params: BaseModel = job_type.validate(raw)
            stages: list[tuple[str, StageFn]] = job_type.stages(params)
        except JobTypeUnavailable as exc:
            self._fail(
                state.error_obj("job_type_unavailable", f"job type {job_type.name!r} is not available: {exc}", "type")
            )
        except ValidationError as exc:
            self._fail(validation_error(exc))
        except (ChorusError, ValueError) as exc:  # a ValueError here is the params' (still being validated)
            family = classify(exc)
            param = exc.param if isinstance(exc, ChorusError) else None
            self._fail(state.error_obj(family.code, str(exc), param or ("params" if family is InvalidParams else None)))
        self.job_type, self.params = job_type, params
        names = [name for name, _ in stages]
        if len(set(names)) != len(names):
            self._fail(state.error_obj("internal_error", f"duplicate stage names {names}"))
        with self.maker() as session:
            rows = state.ensure_stages(session, self.job_id, names)
            done_before = [n for n in names if rows[n].status == StageStatus.SUCCEEDED]
            if done_before:
                state.add_event(
                    session,
                    self.job_id,
                    f"resuming after finished stage(s): {', '.join(done_before)}",
                    data={"skipped": done_before},
                )
                session.commit()
        inputs: dict[str, Path] = {}
        summaries: dict[str, Any] = {}
        artifacts: list[tuple[str, dict[str, str]]] = []
        for index, (name, fn) in enumerate(stages):
            with self.maker() as session:
                row = self._stage_row(session, name)
                assert row is not None
                if row.status == StageStatus.SUCCEEDED:
                    inputs.update(self._materialize(session, name))
                    summaries[name] = (row.outputs or {}).get("summary")
                    artifacts.append((name, (row.outputs or {}).get("artifacts") or {}))
                    continue
            result = self._run_stage(index, len(stages), name, fn, inputs)
            ids = self._commit_stage(name, result)
            summaries[name] = result.summary
            artifacts.append((name, ids))
            with self.maker() as session:
                inputs.update(self._materialize(session, name))
        return self._succeed(summaries, artifacts, len(stages))

    def _run_stage(self, index: int, count: int, name: str, fn: StageFn, inputs: dict[str, Path]) -> StageResult:
        assert self.lease is not None
        with self.maker() as session:
            if not state.guard(session, self.job_id, self.token):
                session.rollback()
                raise _Stop(self._why_not_mine())
            row = self._stage_row(session, name)
            assert row is not None
            row.status, row.attempts, row.started_at, row.error = StageStatus.RUNNING, row.attempts + 1, utcnow(), None
            job = session.get(Job, self.job_id)
            assert job is not None
            progress = JobProgress(
                self.job_id,
                self.token,
                self.lease,
                name,
                index,
                count,
                self.settings.progress_interval,
                self.settings.event_interval,
            )
            job.current_stage = name
            job.progress = progress.snapshot(None, 0, 0, "starting")
            state.add_event(
                session,
                self.job_id,
                f"stage {name} started ({index + 1}/{count})",
                data={"type": "stage", "stage": name, "status": StageStatus.RUNNING, "attempt": row.attempts},
            )
            session.commit()
        started = self._stage_started = time.monotonic()
        sharder = None
        if self.settings.fanout_shards > 1:
            sharder = JobSharder(self.job_id, self.settings, self.dispatch, self._check_stop)
        try:
            self._check_inputs()
            with use_sharder(sharder):
                returned = fn(self._workdir(), dict(inputs), progress)
        except Cancelled:
            self._stopped(name, started)
        except UNAVAILABLE:
            raise  # database outage (e.g. a progress write): end this attempt unfinished; the job is retried
        except Exception as exc:
            if type(exc).__name__ in TIMEOUT_EXCEPTIONS:
                self._fail(state.error_obj("timeout", f"stage {name} exceeded the job time limit"), name)
            if self.lease.stopping:
                self._stopped(name, started)
            error, ours = stage_error(name, exc)
            self._fail(error, name, traceback.format_exc() if ours else None)
        return self._stage_result(name, returned)

    def _stage_result(self, name: str, returned: Any) -> StageResult:
        """What stage `name` returned (a dict summary or a StageResult) as a StageResult checked against the
        workdir; anything else fails the job as stage_failed, the stage's fault."""
        if not isinstance(returned, dict | StageResult):
            self._fail(
                state.error_obj(StageFailed.code, f"stage {name} returned {type(returned).__name__}, not a dict"), name
            )
        workspace = Workspace(self._workdir())
        try:
            if isinstance(returned, StageResult):
                return returned.model_copy(update={"summary": json_safe(returned.summary)}).checked(workspace.root)
            return workspace.result(json_safe(returned))
        except (ValueError, FileNotFoundError) as exc:  # StageOutputError and pydantic's ValidationError
            self._fail(state.error_obj(StageFailed.code, f"stage {name} outputs: {exc}"), name)
            raise  # unreachable: _fail raises _Stop

    def _check_stop(self) -> None:
        assert self.lease is not None
        if self.lease.stopping:
            raise Cancelled("job cancelled" if self.lease.cancelled.is_set() else "lease lost")

    def _stopped(self, name: str, started: float) -> None:
        assert self.lease is not None
        outcome = self._why_not_mine() if not self.lease.cancelled.is_set() else "cancelled"
        if outcome == "cancelled":
            with self.maker() as session:
                row = self._stage_row(session, name)
                if row is not None and row.status == StageStatus.RUNNING:
                    row.status, row.finished_at = StageStatus.CANCELLED, utcnow()
                state.release(session, self.job_id, self.token)
                state.add_event(
                    session,
                    self.job_id,
                    f"worker stopped stage {name} after cancellation",
                    "warning",
                    {
                        "type": "stage",
                        "stage": name,
                        "status": StageStatus.CANCELLED,
                        "ran_seconds": round(time.monotonic() - started, 3),
                    },
                )
                session.commit()
        raise _Stop(outcome)

    def _commit_stage(self, name: str, result: StageResult) -> dict[str, str]:
        workdir = self._workdir()
        with self.maker() as session:
            try:
                ids = ingest_result(
                    session,
                    self.store,
                    job_id=self.job_id,
                    owner=self.claim.owner,
                    stage=name,
                    workdir=workdir,
                    result=result,
                )
            except (ValueError, FileNotFoundError) as exc:  # StageOutputError, mostly: never the user's
                session.rollback()
                self._fail(state.error_obj(StageFailed.code, f"stage {name} outputs: {exc}"), name)
            if not state.guard(session, self.job_id, self.token):
                session.rollback()  # a stage that finished after its job was cancelled is cancelled, not kept
                self._stopped(name, self._stage_started)
            row = self._stage_row(session, name)
            assert row is not None
            row.status, row.finished_at = StageStatus.SUCCEEDED, utcnow()
            row.outputs = {"summary": result.summary, "artifacts": ids}
            state.add_event(
                session,
                self.job_id,
                f"stage {name} finished ({len(ids)} artifact(s))",
                data={"type": "stage", "stage": name, "status": StageStatus.SUCCEEDED, "artifacts": ids},
            )
            session.commit()
        return ids

    def _succeed(self, summaries: dict[str, Any], stage_artifacts: list[tuple[str, dict[str, str]]], count: int) -> str:
        artifacts = merge_stage_artifacts(stage_artifacts)
        result = {"stages": summaries, "artifacts": artifacts}
        progress = {
            "stage": None,
            "stage_index": count,
            "stage_count": count,
            "step": None,
            "done": count,
            "total": count,
            "message": "done",
            "percent": 100.0,
        }
        with self.maker() as session:
            if not state.finish(
                session, self.job_id, self.token, JobStatus.SUCCEEDED, result=result, progress=progress
            ):
                session.rollback()
                raise _Stop(self._why_not_mine())
            job = session.get(Job, self.job_id)
            if job is not None:
                job.current_stage = None
            state.add_event(
                session,
                self.job_id,
                "job succeeded",
                data={"type": "status", "status": JobStatus.SUCCEEDED, "artifacts": artifacts},
            )
            session.commit()
        if not self.settings.keep_workdir:
            shutil.rmtree(self.settings.workdir_root / self.job_id, ignore_errors=True)
        return "succeeded"


@dataclass(frozen=True)
class _Input:
    """A file a param names, copied into the workdir: `ref` is its artifact id, `inline` whether the request
    gave it as an object (stored as an artifact by the API)."""

    field: str
    ref: str
    path: Path
    inline: bool


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _copy_object(source: Path, target: Path) -> None:
    """Copy a stored file or folder (never link: a stage rewriting its input must not touch the store)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, target)


def run_job(job_id: str, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume, or skip) one job; see JobRunner."""
    return JobRunner(job_id, **kwargs).run()
