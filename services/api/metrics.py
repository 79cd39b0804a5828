"""Prometheus metrics of the job API (one registry per app; request metrics from services/http_metrics.py).

chorus_api_requests_total{method,route,status}    requests by route template and final status
chorus_api_request_seconds{method,route}          latency histogram
chorus_api_jobs_created_total{type}               jobs created (idempotent replays not counted)
chorus_api_rate_limited_total{limit}              requests refused by a rate limit (api|create|upload|anon)
chorus_api_jobs{status}                           jobs in the database by status, read at scrape time
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.http_metrics import HttpMetrics
from shared.db.models import JOB_STATUSES

log = logging.getLogger("chorus.api")


class JobStatusCollector(Collector):
    """`chorus_api_jobs{status}` from one `SELECT status, count(*) ... GROUP BY status` per scrape (on the
    autocommit read engine). If the database cannot be read, the family is left out of that scrape."""

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "chorus_api_jobs", "Jobs in the database by status (read at scrape time).", labels=["status"]
        )

    def describe(self) -> Iterator[Metric]:  # registration must not query the database
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from shared.db.models import Job
        from shared.db.session import read_all

        try:
            counts = {
                r["status"]: r["n"] for r in read_all(select(Job.status, func.count().label("n")).group_by(Job.status))
            }
        except Exception as exc:
            log.warning("metrics: cannot count jobs by status: %s", exc)
            return
        family = self._family()
        for status in (*JOB_STATUSES, *sorted(set(counts) - set(JOB_STATUSES))):
            family.add_metric([status], counts.get(status, 0))
        yield family


class ApiMetrics(HttpMetrics):
    blocking_render = True  # the job-status gauge queries the database

    def __init__(self) -> None:
        super().__init__("chorus_api")
        self.jobs_created = Counter(
            "chorus_api_jobs_created", "Jobs created, by type.", ["type"], registry=self.registry
        )
        self.rate_limited = Counter(
            "chorus_api_rate_limited", "Requests refused by a rate limit.", ["limit"], registry=self.registry
        )
        self.registry.register(JobStatusCollector())
