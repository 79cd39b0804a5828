"""Verified API keys by hash for a few seconds: the authentication dependency and the rate limiter both read it,
and revoking a key clears it."""

from __future__ import annotations

import threading
import time

from services.principal import Principal


class KeyCache:
    """Verified keys by hash for a few seconds (a revoked key stops working within that time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, Principal]] = {}

    def get(self, digest: str) -> Principal | None:
        item = self._items.get(digest)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    def put(self, digest: str, principal: Principal, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[digest] = (time.monotonic() + ttl, principal)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


key_cache = KeyCache()
