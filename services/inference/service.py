"""The inference service's state: one base model, the multi-LoRA engine, loaded ensembles, the batcher.

Threads: every use of the model and the engine's slots happens on ONE worker thread (`model_executor`);
adapter files are read and verified on an I/O pool; prompts are tokenized on an encoding thread; the
event loop only routes. Hot swap: the registry maps an id to a reference-counted `LoadedEnsemble`;
a request takes a reference before its rows are queued, so a load or unload that replaces or removes
the entry never affects it; the replaced ensemble's adapters are unpinned when its last request ends.
Ownership: `owners` maps a loaded id to its owner (None: admin keys only); lookups for a key pass its
owner and get 404 for anyone else's ensemble, exactly as for one that is not loaded (no existence leak).
Lazy loading (settings.lazy_load, off by default): a classify request naming an ensemble that is not loaded
loads it first when the key may see it (`load_on_request`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from services.inference.errors import ApiError
from services.inference.metrics import InferenceMetrics
from services.inference.settings import InferenceSettings
from services.inference.sources import (
    EnsembleNotFound,
    EnsembleSource,
    IntegrityError,
    InvalidEnsemble,
    ResolvedEnsemble,
    check_id,
)
from shared.ml.serving.batcher import DynamicBatcher
from shared.ml.serving.ensemble_runner import EnsembleLoadError, EnsembleRunner, LoadedEnsemble, RowError
from shared.ml.serving.multi_lora import MultiLoRAEngine, NoFreeSlotError

log = logging.getLogger("chorus.inference")


class InferenceService:
    def __init__(
        self, settings: InferenceSettings, base: Any, source: EnsembleSource, metrics: InferenceMetrics | None = None
    ) -> None:
        self.settings = settings
        self.base = base
        self.source = source
        self.metrics = metrics or InferenceMetrics()
        self.engine = MultiLoRAEngine(
            base.model,
            max_slots=settings.max_adapters,
            max_host_adapters=settings.max_host_adapters,
            max_rank=settings.max_rank,
            targets=settings.target_list,
            dtype=getattr(torch, str(base.info.compute_dtype).removeprefix("torch."), None),
        )
        self.runner = EnsembleRunner(
            self.engine,
            base.tokenizer,
            base.info,
            max_forward_rows=settings.max_batch_rows,
            max_row_chars=settings.max_row_chars,
        )
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="chorus-model")
        self.io_executor = ThreadPoolExecutor(2, thread_name_prefix="chorus-load")
        self.encode_executor = ThreadPoolExecutor(1, thread_name_prefix="chorus-encode")
        self.batcher = DynamicBatcher(
            self._process,
            self.model_executor,
            max_batch=settings.max_batch_rows,
            max_wait_ms=settings.max_wait_ms,
            size=lambda job: self.runner.pair_count(job[1]),
            on_batch=self.metrics.on_batch,
        )
        self.ensembles: dict[str, LoadedEnsemble] = {}
        self.owners: dict[str, str | None] = {}  # changed together with `ensembles`, on the event loop
        self._admin_locks: dict[int, asyncio.Lock] = {}
        self._closed = False
        self.started_at = time.time()
        self.metrics.bind(
            resident=lambda: len(self.engine.resident()),
            pinned=lambda: len(self.engine.pinned()),
            cached=lambda: len(self.engine._host),
            ensembles=lambda: len(self.ensembles),
            queued=lambda: self.batcher.pending,
        )

    # ---- helpers ---------------------------------------------------------------------------------

    def _admin_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._admin_locks.get(id(loop))
        if lock is None:
            lock = self._admin_locks[id(loop)] = asyncio.Lock()
        return lock

    async def _on(self, executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _process(self, jobs: list[tuple[LoadedEnsemble, list[Any]]]) -> list[Any]:
        """Batcher callback (model thread): all rows of all jobs in one pass."""
        return self.runner.run(jobs)

    def _unpin_later(self, ensemble: LoadedEnsemble) -> None:
        if self._closed:
            return
        try:
            self.model_executor.submit(self.runner.deactivate, ensemble)
        except RuntimeError:  # executor already shut down
            pass

    # ---- owner-scoped lookups --------------------------------------------------------------------

    def get(self, ensemble_id: str, owner: str | None = None) -> LoadedEnsemble:
        """The loaded ensemble if `owner` may see it (owner None: any); 404 otherwise."""
        ensemble = self.ensembles.get(ensemble_id)
        if ensemble is None or (owner is not None and self.owners.get(ensemble_id) != owner):
            raise ApiError(404, "not_found", f"ensemble {ensemble_id!r} is not loaded", "id")
        return ensemble

    def visible(self, owner: str | None = None) -> list[LoadedEnsemble]:
        return [e for i, e in self.ensembles.items() if owner is None or self.owners.get(i) == owner]

    def describe(self, ensemble: LoadedEnsemble) -> dict[str, Any]:
        return {**ensemble.describe(self.engine), "owner": self.owners.get(ensemble.id)}

    # ---- admin -----------------------------------------------------------------------------------

    async def load(
        self, ensemble_id: str, owner: str | None = None, default_owner: str | None = None
    ) -> tuple[LoadedEnsemble, bool]:
        """(the loaded ensemble, whether it was newly loaded). Reloading an id with a changed manifest
        swaps it in atomically; an unchanged one is a no-op (apart from a new owner of a folder ensemble).
        Owner: the job owner's for a database ensemble (`owner`, if given, must match it); for a folder,
        `owner`, else the owner it already has (a hot swap keeps it), else `default_owner` (None: admin
        keys only)."""
        try:
            check_id(ensemble_id)
        except EnsembleNotFound as exc:
            raise ApiError(422, "invalid_request", str(exc), "id") from exc
        async with self._admin_lock():
            start = time.perf_counter()
            resolved = await self._resolve(ensemble_id)
            if resolved.owner is not None and owner is not None and owner != resolved.owner:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"owner: ensemble {ensemble_id!r} was recorded by a job and "
                    "belongs to that job's owner; leave owner out",
                    "owner",
                )
            return await self._install(ensemble_id, resolved, owner, default_owner, start)

    async def load_on_request(self, ensemble_id: str, owner: str | None, default_owner: str | None) -> LoadedEnsemble:
        """Load a not-yet-loaded ensemble for the request that names it (`lazy_load`, LoRAX-style), if the
        caller may see it: a key of the owner of a job's ensemble, or an admin key (a folder ensemble has no
        owner, so only admin keys load one this way; it then belongs to `default_owner`, the admin key's
        owner, as with POST .../load). Anything else, and any failure to resolve the id for a non-admin key,
        is 404 "not loaded", exactly as without lazy loading (no existence leak); admin keys get the load
        route's errors. The ensemble stays loaded (an admin unloads it); concurrent first requests load it once."""
        not_loaded = ApiError(404, "not_found", f"ensemble {ensemble_id!r} is not loaded", "id")
        try:
            check_id(ensemble_id)
        except EnsembleNotFound as exc:
            raise not_loaded from exc
        async with self._admin_lock():
            if ensemble_id in self.ensembles:  # a concurrent first request loaded it meanwhile
                return self.get(ensemble_id, owner)
            start = time.perf_counter()
            try:
                resolved = await self._resolve(ensemble_id)
            except ApiError as exc:
                if owner is None:
                    raise
                log.warning("lazy load of %s for owner %s refused: %s", ensemble_id, owner, exc.message)
                raise not_loaded from exc
            if owner is not None and resolved.owner != owner:
                raise not_loaded
            ensemble, _ = await self._install(ensemble_id, resolved, None, default_owner, start)
            self.metrics.lazy_loads.inc()
            log.info("loaded ensemble %s on its first request", ensemble_id)
            return ensemble

    async def _resolve(self, ensemble_id: str) -> ResolvedEnsemble:
        """The source's ensemble for an id, its errors as API errors (404, 409 integrity, 422 invalid)."""
        try:
            return await self._on(self.io_executor, self.source.resolve, ensemble_id)
        except EnsembleNotFound as exc:
            raise ApiError(404, "not_found", str(exc), "id") from exc
        except IntegrityError as exc:  # a stored file no longer matches its record
            raise ApiError(409, "artifact_integrity", str(exc), exc.param) from exc
        except InvalidEnsemble as exc:
            raise ApiError(422, "invalid_ensemble", str(exc), "id") from exc

    async def _install(
        self, ensemble_id: str, resolved: ResolvedEnsemble, owner: str | None, default_owner: str | None, start: float
    ) -> tuple[LoadedEnsemble, bool]:
        """Prepare and activate a resolved ensemble under `ensemble_id` (caller holds the admin lock)."""
        current = self.ensembles.get(ensemble_id)
        new_owner = resolved.owner or owner or (self.owners.get(ensemble_id) if current else None) or default_owner
        fingerprint = resolved.manifest.fingerprint
        if current is not None and fingerprint is not None and current.fingerprint == fingerprint:
            self.owners[ensemble_id] = new_owner
            return current, False
        try:
            ensemble = await self._on(
                self.io_executor, self.runner.prepare, ensemble_id, resolved.manifest, resolved.member_folders
            )
        except EnsembleLoadError as exc:
            status = 409 if exc.kind == "base_mismatch" else 422
            raise ApiError(status, exc.kind, exc.message, exc.param) from exc
        try:
            await self._on(self.model_executor, self.runner.activate, ensemble)
        except NoFreeSlotError as exc:
            raise ApiError(409, "adapter_capacity", str(exc)) from exc
        ensemble.on_last_release = self._unpin_later
        ensemble.load_seconds = time.perf_counter() - start
        self.ensembles[ensemble_id] = ensemble
        self.owners[ensemble_id] = new_owner
        if current is not None:
            current.retire()  # in-flight requests keep it alive until they finish
        self.metrics.adapter_loads.observe(ensemble.load_seconds)
        log.info(
            "loaded ensemble %s (%s, fingerprint %s) in %.3f s",
            ensemble_id,
            resolved.origin,
            ensemble.fingerprint[:12],
            ensemble.load_seconds,
        )
        return ensemble, True

    async def unload(self, ensemble_id: str) -> LoadedEnsemble:
        async with self._admin_lock():
            ensemble = self.ensembles.pop(ensemble_id, None)
            self.owners.pop(ensemble_id, None)
            if ensemble is None:
                raise ApiError(404, "not_found", f"ensemble {ensemble_id!r} is not loaded", "id")
            ensemble.retire()
            log.info("unloaded ensemble %s (%d request(s) still in flight)", ensemble_id, ensemble.in_flight)
            return ensemble

    # ---- classify --------------------------------------------------------------------------------

    async def classify(
        self, ensemble_id: str, rows: list[dict[str, Any]], owner: str | None = None, default_owner: str | None = None
    ) -> tuple[LoadedEnsemble, list[Any]]:
        """Rows through ensemble `ensemble_id` if `owner` may see it (None: any). With `lazy_load` an
        ensemble that is not loaded yet is loaded first (see load_on_request; `default_owner`: the caller's)."""
        if len(rows) > self.settings.max_rows_per_request:
            raise ApiError(
                422,
                "invalid_request",
                f"rows: {len(rows)} rows exceed the limit of {self.settings.max_rows_per_request} per request",
                "rows",
            )
        if self.settings.lazy_load and ensemble_id not in self.ensembles:
            ensemble = await self.load_on_request(ensemble_id, owner, default_owner)
        else:
            ensemble = self.get(ensemble_id, owner)
        if not ensemble.acquire():
            raise ApiError(404, "not_found", f"ensemble {ensemble_id!r} is not loaded", "id")
        try:
            try:
                encoded = await self._on(self.encode_executor, self.runner.encode_rows, ensemble, rows)
            except RowError as exc:
                raise ApiError(422, "invalid_row", exc.message, exc.param) from exc
            results = await self.batcher.submit((ensemble, encoded))
            self.metrics.rows.inc(len(rows))
            return ensemble, results
        finally:
            ensemble.release()

    # ---- lifecycle -------------------------------------------------------------------------------

    async def preload(self, ids: list[str]) -> None:
        for ensemble_id in ids:
            try:
                await self.load(ensemble_id)
            except ApiError as exc:
                log.error("preloading ensemble %s failed: %s", ensemble_id, exc.message)

    async def close(self) -> None:
        await self.batcher.close()
        self._closed = True
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        self.io_executor.shutdown(wait=False, cancel_futures=True)
        self.encode_executor.shutdown(wait=False, cancel_futures=True)
