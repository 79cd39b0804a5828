"""Run a study: for every seed, the affinity arm (a pipeline job: Stage 1, grouping, group adapters, with
the single all-task adapter as its baseline), random groups of the affinity groups' sizes, and one adapter
per task, all trained and selected the same way; then paired statistics on the test rows.

Folder layout (every arm is resumable on its own: a finished arm is never trained again):

    OUT/seed_<s>/affinity/   pipeline run (report.json, train_report.json, predictions.json, ...)
    OUT/seed_<s>/random/     training run on the random groups
    OUT/seed_<s>/per_task/   training run on singleton groups
    OUT/study.json  study.md  study.png

Arms run in this process (`workers` 1), in a pool of `workers` processes spread over the visible GPUs, or, under a
job runner's sharder (shared/ml/sharding.py), as two fan-out phases over the queue's workers: first the affinity and
per-task arms of every seed, then the random arms (their sizes come from the affinity groups). A piece trains its
arms in its worker and skips finished ones, so any cut gives the same arms.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from shared.ml.progress import Progress, silent
from shared.ml.sharding import Phase, current_sharder, use_sharder
from shared.ml.study.outcomes import PREDICTIONS
from shared.ml.study.params import StudyParams
from shared.ml.study.report import write_report


def random_groups(tasks: list[str], sizes: list[int], seed: int) -> list[list[str]]:
    """A seeded random partition of `tasks` into groups of the given sizes."""
    if sum(sizes) != len(tasks):
        raise ValueError(f"group sizes {sizes} do not add up to the {len(tasks)} tasks")
    order = np.random.default_rng(10_007 + seed).permutation(len(tasks))
    out, start = [], 0
    for size in sizes:
        out.append(sorted((tasks[i] for i in order[start : start + size]), key=tasks.index))
        start += size
    return out


def _done(folder: Path) -> bool:
    return (folder / PREDICTIONS).is_file() and (folder / "train_report.json").is_file()


def _set_device(slot: int, workers: int = 1) -> None:
    """Pin a worker process to one GPU (round-robin over the visible ones) before torch initialises CUDA, and give
    it its share of that GPU's memory for automatic batch sizes (unless CHORUS_GPU_MEMORY_SHARE is set already)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x for x in visible.split(",") if x.strip()] if visible else None
    if ids is None:
        try:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        except Exception:  # noqa: BLE001 - no CUDA: nothing to pin
            ids = []
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]
        sharing = -(-workers // len(ids))  # processes of the pool on the busiest GPU
        os.environ.setdefault("CHORUS_GPU_MEMORY_SHARE", f"{1 / sharing:.6g}")


def train_affinity_arm(params: StudyParams, seed: int, folder: Path) -> None:
    """The affinity arm of one seed: the pipeline job (Stage 1, grouping, group adapters, the single baseline)."""
    from shared.ml.training.stage import run_pipeline

    run_pipeline(params.pipeline_params(seed), folder)


def train_control_arm(params: StudyParams, seed: int, groups: list[list[str]], folder: Path) -> None:
    """A control arm of one seed: Stage 2 alone on the given groups (random groups, or one task per group)."""
    from shared.ml.training.stage import run_training

    run_training(params.arm_training_params(seed, groups), folder)


def _run_affinity_arm(params_json: str, seed: int, folder: str, slot: int) -> str:
    params = StudyParams.model_validate_json(params_json)
    _set_device(slot, params.workers)
    train_affinity_arm(params, seed, Path(folder))
    return folder


def _run_control_arm(params_json: str, seed: int, groups: list[list[str]], folder: str, slot: int) -> str:
    params = StudyParams.model_validate_json(params_json)
    _set_device(slot, params.workers)
    train_control_arm(params, seed, groups, Path(folder))
    return folder


# The fan-out phases: the arms each piece index stands for (the random arms need their seed's affinity groups).
FIRST_ARMS = ("affinity", "per_task")


def _piece_arm(params: StudyParams, phase: str, index: int) -> tuple[int, str]:
    if phase == "first":
        return params.seeds[index // len(FIRST_ARMS)], FIRST_ARMS[index % len(FIRST_ARMS)]
    return params.seeds[index], "random"


def run_arm_shard(
    args: dict[str, Any], workdir: Path, progress: Progress, start: int, end: int, cache: dict[str, Any]
) -> dict[str, Any]:
    """Shard function of the study's fan-out phases: train arms [start, end) of args["phase"] here (finished arms
    are skipped). An arm's own shardable phases run inside this piece (no nested fan-out)."""
    params = StudyParams.model_validate_json(args["params"])
    tasks = list(params.tasks)
    trained = []
    with use_sharder(None):
        for i in range(start, end):
            seed, arm = _piece_arm(params, args["phase"], i)
            folder = Path(workdir) / f"seed_{seed}" / arm
            progress("study arms", i - start, end - start, f"seed {seed} {arm}")
            if _done(folder):
                continue
            if arm == "affinity":
                train_affinity_arm(params, seed, folder)
            elif arm == "per_task":
                train_control_arm(params, seed, [[t] for t in tasks], folder)
            else:
                sizes = [len(g) for g in _affinity_groups(Path(workdir) / f"seed_{seed}" / "affinity")]
                train_control_arm(params, seed, random_groups(tasks, sizes, seed), folder)
            trained.append(f"seed {seed} {arm}")
    return {"trained": trained}


def _fan_out_arms(params: StudyParams, workdir: Path, progress: Progress, sharder: Any) -> None:
    blob = params.model_dump_json()
    n = len(params.seeds)
    for phase, size, label in (
        ("first", len(FIRST_ARMS) * n, "study affinity and per-task arms"),
        ("random", n, "study random arms"),
    ):
        sharder.run(
            Phase(
                name=f"study:{phase}",
                label=label,
                size=size,
                fn="shared.ml.study.run:run_arm_shard",
                args={"params": blob, "phase": phase},
                unit="arms",
            ),
            workdir,
            progress,
            {},
        )


def _affinity_groups(folder: Path) -> list[list[str]]:
    return [list(g) for g in json.loads((folder / "groups.json").read_text())["groups"]]


def train_arms(params: StudyParams, workdir: Path, progress: Progress = silent) -> dict[int, dict[str, Any]]:
    """Train every arm of every seed (skipping finished ones); returns per seed the groups of each arm."""
    tasks = list(params.tasks)
    blob = params.model_dump_json()
    jobs_total = 3 * len(params.seeds)
    done = 0
    started = time.perf_counter()

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        progress("study", done, jobs_total, f"{message} ({time.perf_counter() - started:.0f} s)")

    folders = {
        s: {arm: workdir / f"seed_{s}" / arm for arm in ("affinity", "random", "per_task")} for s in params.seeds
    }
    singletons = [[t] for t in tasks]
    progress("study", 0, jobs_total, "training arms")
    sharder = current_sharder()
    if sharder is not None:
        _fan_out_arms(params, workdir, progress, sharder)
    elif params.workers == 1:
        for k, s in enumerate(params.seeds):
            if not _done(folders[s]["affinity"]):
                _run_affinity_arm(blob, s, str(folders[s]["affinity"]), k)
            tick(f"seed {s} affinity")
            if not _done(folders[s]["per_task"]):
                _run_control_arm(blob, s, singletons, str(folders[s]["per_task"]), k)
            tick(f"seed {s} per_task")
            sizes = [len(g) for g in _affinity_groups(folders[s]["affinity"])]
            if not _done(folders[s]["random"]):
                _run_control_arm(blob, s, random_groups(tasks, sizes, s), str(folders[s]["random"]), k)
            tick(f"seed {s} random")
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(params.workers, mp_context=mp.get_context("spawn"))
        try:
            slot = iter(range(10**6))
            futures: dict[Any, tuple[int, str]] = {}
            # (arm, its function, the arguments between the seed and the arm's folder)
            arms: tuple[tuple[str, Callable[..., str], tuple[Any, ...]], ...] = (
                ("affinity", _run_affinity_arm, ()),
                ("per_task", _run_control_arm, (singletons,)),
            )
            for s in params.seeds:
                for arm, fn, args in arms:
                    if _done(folders[s][arm]):
                        tick(f"seed {s} {arm}")
                    else:
                        futures[pool.submit(fn, blob, s, *args, str(folders[s][arm]), next(slot))] = (s, arm)
            pending = set(futures)
            while pending:
                finished = {f for f in pending if f.done()}
                if not finished:
                    time.sleep(0.5)
                    continue
                pending -= finished
                for f in finished:
                    f.result()  # re-raise a failed arm
                    s, arm = futures[f]
                    tick(f"seed {s} {arm}")
                    if arm == "affinity":
                        sizes = [len(g) for g in _affinity_groups(folders[s]["affinity"])]
                        if _done(folders[s]["random"]):
                            tick(f"seed {s} random")
                        else:
                            g = pool.submit(
                                _run_control_arm,
                                blob,
                                s,
                                random_groups(tasks, sizes, s),
                                str(folders[s]["random"]),
                                next(slot),
                            )
                            futures[g] = (s, "random")
                            pending.add(g)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # a failed arm stops the study; queued arms never start
            raise
        pool.shutdown(wait=True)
    out: dict[int, dict[str, Any]] = {}
    for s in params.seeds:
        aff = _affinity_groups(folders[s]["affinity"])
        out[s] = {"affinity": aff, "random": random_groups(tasks, [len(g) for g in aff], s), "per_task": singletons}
    return out


def run_study(params: StudyParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """Train all arms for every seed, then write study.json, study.md and study.png into `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recorded = workdir / "study_params.json"
    blob = params.model_dump(mode="json")
    if recorded.exists() and json.loads(recorded.read_text()) != blob:
        raise ValueError(f"{workdir} holds a study with different parameters; use another output folder")
    recorded.write_text(json.dumps(blob, indent=2))
    groups = train_arms(params, workdir, progress)
    study = write_report(params, workdir, groups)
    return {
        "arms": {k: v["average"] for k, v in study["arms"].items()},
        "differences": {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in study["differences"].items()},
        "artifacts": {"study": "study.json", "table": "study.md", "chart": "study.png"},
    }
