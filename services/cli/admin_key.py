"""Where the bootstrap admin key is handed to the operator: a file only its owner can read (never a log)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def admin_key_path() -> Path:
    """CHORUS_ADMIN_KEY_FILE, else CHORUS_HOME/admin-key."""
    from services.api.settings import ApiSettings
    from shared.config import get_settings

    return ApiSettings().admin_key_file or get_settings().home / "admin-key"


def write_secret(path: Path, secret: str) -> Path:
    """Write `secret` to `path` with mode 0600 (created so from the start, whatever the umask; replaced
    atomically if it exists). Returns the absolute path."""
    path = path.expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path
