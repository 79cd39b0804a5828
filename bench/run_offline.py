"""Run one job type in this process, without the service: the same library functions the worker calls.

For machines that have the ML stack but not the web stack (e.g. a rented GPU box without FastAPI/Celery):

    python bench/run_offline.py pipeline '{"tasks": ["sst2", "mr", "cr"], "max_train": 200}' /tmp/run
    python bench/run_offline.py validate_estimates @params.json /tmp/val

PARAMS is JSON or @file. The summary is printed as JSON and written to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.jobs.registry import JOB_TYPES  # noqa: E402
from shared.ml.progress import TqdmProgress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job_type", choices=sorted(JOB_TYPES))
    ap.add_argument("params", help="JSON object, or @path of a JSON file")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    text = Path(args.params[1:]).read_text() if args.params.startswith("@") else args.params
    job_type = JOB_TYPES[args.job_type]
    params = job_type.validate(json.loads(text))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.job_type == "pipeline":
        from shared.ml.training.stage import run_pipeline

        summary = run_pipeline(params, args.out, TqdmProgress())
    else:
        summaries = {}
        for name, stage in job_type.stages(params):
            summaries[name] = stage(args.out, {}, TqdmProgress())
        summary = summaries if len(summaries) > 1 else next(iter(summaries.values()))
    summary = {"job_type": args.job_type, "wall_seconds": round(time.perf_counter() - t0, 1), "summary": summary}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str)[:20000])


if __name__ == "__main__":
    main()
