"""Load benchmark of the job API: job-create latency (p50/p99) and status polls per second.

Run it against a running API (PostgreSQL recommended: DATABASE_URL=postgresql://... chorus api):

    CHORUS_API_URL=http://127.0.0.1:8000 CHORUS_API_KEY=<submit key> python bench/api_load.py

It creates --creates jobs one after another (each timed), cancels each right away so no worker runs it,
then polls GET /v1/jobs/{id} from --clients threads for --seconds and prints the figures (and --json).
Prints numbers only; nothing is asserted (targets: create p99 < 50 ms, >= 500 polls/s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("CHORUS_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--key", default=os.environ.get("CHORUS_API_KEY"))
    parser.add_argument("--creates", type=int, default=300, help="jobs to create (timed one by one)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed creates and polls first")
    parser.add_argument("--clients", type=int, default=8, help="concurrent polling threads")
    parser.add_argument("--seconds", type=float, default=10.0, help="polling duration")
    parser.add_argument("--type", default="evaluation")
    parser.add_argument("--params", default='{"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4}')
    parser.add_argument(
        "--server-pids",
        default="",
        help="comma-separated API process ids (same machine): "
        "also report the server's CPU time per poll, read from /proc",
    )
    parser.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = parser.parse_args()
    if not args.key:
        parser.error("pass --key or set CHORUS_API_KEY (a key with the submit scope)")
    headers = {"Authorization": f"Bearer {args.key}"}
    params = json.loads(args.params)
    run = uuid.uuid4().hex[:8]

    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as http:

        def create(i: int) -> tuple[str, float]:
            body = {"type": args.type, "params": {**params, "seed": i}, "metadata": {"bench": run}}
            start = time.perf_counter()
            r = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"bench-{run}-{i}"})
            elapsed = time.perf_counter() - start
            if r.status_code != 201:
                raise SystemExit(f"create failed: {r.status_code} {r.text[:300]}")
            job_id = r.json()["id"]
            http.post(f"/v1/jobs/{job_id}/cancel")  # keep workers idle and the owner under its quota
            return job_id, elapsed

        for i in range(args.warmup):
            create(-1 - i)
        latencies, ids = [], []
        wall = time.perf_counter()
        for i in range(args.creates):
            job_id, elapsed = create(i)
            ids.append(job_id)
            latencies.append(elapsed * 1000)
        create_wall = time.perf_counter() - wall

    counts = [0] * args.clients
    errors = [0] * args.clients
    poll_lat: list[list[float]] = [[] for _ in range(args.clients)]
    stop = threading.Event()

    def poller(k: int) -> None:
        with httpx.Client(base_url=args.url, headers=headers, timeout=30) as http:
            i = k
            while not stop.is_set():
                start = time.perf_counter()
                r = http.get(f"/v1/jobs/{ids[i % len(ids)]}")
                poll_lat[k].append((time.perf_counter() - start) * 1000)
                if r.status_code == 200:
                    counts[k] += 1
                else:
                    errors[k] += 1
                i += args.clients

    threads = [threading.Thread(target=poller, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(min(2.0, args.seconds / 5))  # warm-up
    base = sum(counts)
    for lat in poll_lat:
        lat.clear()
    pids = [int(p) for p in args.server_pids.split(",") if p.strip()]
    cpu_before = sum(cpu_seconds(p) for p in pids)
    start = time.perf_counter()
    time.sleep(args.seconds)
    polled = sum(counts) - base
    elapsed = time.perf_counter() - start
    cpu_used = sum(cpu_seconds(p) for p in pids) - cpu_before
    stop.set()
    for t in threads:
        t.join(timeout=10)
    all_poll = [x for lat in poll_lat for x in lat]

    figures = {
        "url": args.url,
        "creates": args.creates,
        "create_ms_p50": round(percentile(latencies, 50), 2),
        "create_ms_p99": round(percentile(latencies, 99), 2),
        "create_ms_mean": round(statistics.fmean(latencies), 2),
        "create_ms_max": round(max(latencies), 2),
        "creates_per_s_sequential": round(args.creates / create_wall, 1),
        "poll_clients": args.clients,
        "polls_per_s": round(polled / elapsed, 1),
        "poll_ms_p50": round(percentile(all_poll, 50), 2) if all_poll else None,
        "poll_ms_p99": round(percentile(all_poll, 99), 2) if all_poll else None,
        "poll_errors": sum(errors),
        "server_cpu_ms_per_poll": round(1000 * cpu_used / max(polled, 1), 3) if pids else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"job create: p50 {figures['create_ms_p50']} ms, p99 {figures['create_ms_p99']} ms "
        f"(mean {figures['create_ms_mean']} ms, max {figures['create_ms_max']} ms, n={args.creates})"
    )
    print(
        f"status polls: {figures['polls_per_s']}/s with {args.clients} clients "
        f"(p50 {figures['poll_ms_p50']} ms, p99 {figures['poll_ms_p99']} ms, errors {figures['poll_errors']})"
    )
    if pids:
        print(
            f"server CPU per poll: {figures['server_cpu_ms_per_poll']} ms "
            f"(= {1000 / max(figures['server_cpu_ms_per_poll'], 1e-9):.0f} polls/s per fully available core)"
        )
    print(f"machine: {figures['cpu_count']} cores, load average {figures['load_average_1m']} during the run")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
