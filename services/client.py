"""A small Python client for the chorus job API (httpx).

    from services.client import Client
    c = Client()                      # CHORUS_API_URL (default http://127.0.0.1:8000), CHORUS_API_KEY
    job = c.create_job("pipeline", {"tasks": ["cb", "rte", "copa"], "model": "smollm2-135m"})
    for event in c.follow(job["id"]):
        print(event["message"])
    c.download_artifact(c.get_job(job["id"])["result_artifacts"]["groups.json"], "groups.json")

A request refused by the API's rate limit (429 `rate_limited` with Retry-After) is retried after the delay
the server asks for, up to `max_retries` times while the delay is at most `max_retry_wait` seconds (it was
refused before doing anything, so a retry is safe); otherwise ChorusError carries `retry_after`.
Uploads and streamed downloads are not retried.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ChorusError(Exception):
    """An API error: HTTP status plus the error object's code, message and param."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after = retry_after  # seconds, from the Retry-After header of a 429 / 503


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
    ) -> None:
        self.max_retries, self.max_retry_wait = max_retries, max_retry_wait
        self.base_url = (base_url or os.environ.get("CHORUS_API_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("CHORUS_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------
    @staticmethod
    def _raise(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            err = response.json()["error"]
            code, message, param = err.get("code", "error"), err.get("message", ""), err.get("param")
        except (ValueError, KeyError, TypeError, AttributeError):
            code, message, param = "http_error", response.text[:500], None
        raise ChorusError(response.status_code, code, message, param, _retry_after(response))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retries = 0 if "files" in kwargs else self.max_retries
        for attempt in range(retries + 1):
            response = self.http.request(method, path, **kwargs)
            wait = _retry_after(response) if response.status_code == 429 else None
            if wait is None or attempt == retries or wait > self.max_retry_wait:
                break
            time.sleep(wait)
        self._raise(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def _clean(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in params.items() if v is not None}

    # -- jobs ---------------------------------------------------------------------------------------
    def create_job(
        self,
        type: str,
        params: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"type": type, "params": params or {}, "metadata": metadata or {}}
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self, status: str | None = None, type: str | None = None, limit: int = 20, after: str | None = None
    ) -> dict[str, Any]:
        return self._json(
            "GET", "/v1/jobs", params=self._clean({"status": status, "type": type, "limit": limit, "after": after})
        )

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        after = None
        while True:
            page = self.list_jobs(after=after, limit=100, **filters)
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["last_id"]

    def events(self, job_id: str, after: int | None = None, limit: int = 100) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/events", params=self._clean({"after": after, "limit": limit}))

    def follow(self, job_id: str, poll: float = 1.0, after: int | None = None) -> Iterator[dict[str, Any]]:
        """Every event of the job as it happens, until the job is finished (then the iterator ends)."""
        while True:
            page = self.events(job_id, after=after, limit=1000)
            for event in page["data"]:
                after = event["id"]
                yield event
            if page["has_more"]:
                continue
            if self.get_job(job_id)["status"] in TERMINAL:
                page = self.events(job_id, after=after, limit=1000)
                yield from page["data"]
                return
            time.sleep(poll)

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
            time.sleep(poll)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def job_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def job_types(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/job-types")["data"]

    # -- datasets -----------------------------------------------------------------------------------
    def upload_dataset(
        self,
        path: str | Path,
        name: str,
        text_fields: str | list[str],
        label_field: str,
        format: str | None = None,
        template: str | None = None,
        label_names: list[str] | None = None,
        id_field: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        path = Path(path)
        fields = ",".join(text_fields) if isinstance(text_fields, list) else text_fields
        data = self._clean(
            {
                "name": name,
                "text_fields": fields,
                "label_field": label_field,
                "format": format,
                "template": template,
                "id_field": id_field,
                "description": description,
                "label_names": ",".join(label_names) if label_names else None,
            }
        )
        with path.open("rb") as fh:
            return self._json("POST", "/v1/datasets", data=data, files={"file": (path.name, fh)})

    def list_datasets(self, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        return self._json("GET", "/v1/datasets", params=self._clean({"limit": limit, "after": after}))

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/datasets/{dataset_id}")

    # -- artifacts, adapters, ensembles -------------------------------------------------------------
    def get_artifact(self, artifact_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/artifacts/{artifact_id}")

    def artifact_bytes(self, artifact_id: str, format: str = "tar.gz") -> bytes:
        return self.request("GET", f"/v1/artifacts/{artifact_id}/content", params={"format": format}).content

    def download_artifact(self, artifact_id: str, dest: str | Path, format: str = "tar.gz") -> Path:
        """Stream an artifact (a folder arrives as an archive) into `dest`."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/artifacts/{artifact_id}/content", params={"format": format}) as response:
            if response.status_code >= 400:
                response.read()
                self._raise(response)
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        return dest

    def download_results(self, job_id: str, dest: str | Path, format: str = "tar.gz") -> dict[str, Path]:
        """Every artifact of a job into dest/<stage>/<filename> (folders as archives); {logical name: path}."""
        dest = Path(dest)
        job = self.get_job(job_id)
        by_id = {art_id: name for name, art_id in job["result_artifacts"].items()}
        out: dict[str, Path] = {}
        for art in self.job_artifacts(job_id):
            suffix = f".{format}" if art["kind"] == "folder" else ""
            target = dest / (art["stage"] or "inputs") / f"{art['filename']}{suffix}"
            out[by_id.get(art["id"], f"{art['stage']}/{art['name']}")] = self.download_artifact(
                art["id"], target, format
            )
        return out

    def list_adapters(self, job_id: str | None = None) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/adapters", params=self._clean({"job_id": job_id, "limit": 100}))["data"]

    def list_ensembles(self, job_id: str | None = None) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/ensembles", params=self._clean({"job_id": job_id, "limit": 100}))["data"]

    def get_ensemble(self, ensemble_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/ensembles/{ensemble_id}")

    # -- keys (admin) -------------------------------------------------------------------------------
    def create_key(self, owner: str, scopes: list[str], name: str = "") -> dict[str, Any]:
        return self._json("POST", "/v1/keys", json={"owner": owner, "scopes": scopes, "name": name})

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/keys/{key_id}")
