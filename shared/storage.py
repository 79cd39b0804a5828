"""Content-addressed artifact store: files and folders kept by sha256 under `get_settings().artifacts`.

Layout under the root:
    objects/<aa>/<sha256>        a file
    objects/<aa>/<sha256>.d/     a folder (e.g. a PEFT adapter), addressed by the digest of its manifest
    archives/<sha256>-<name>.tar.gz|.zip   deterministic download archives of folders (a cache)
    tmp/                          staging; objects appear by atomic rename only

Writing the same content twice stores it once; `record_artifact` adds the database row (one per
job/stage/logical name), so re-ingesting a stage's outputs after a redelivery creates no duplicates.
Nothing here unpickles anything: artifacts are opaque bytes to the store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import mimetypes
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.config import get_settings

CHUNK = 1 << 20
ARCHIVE_FORMATS = ("tar.gz", "zip")
_MEDIA_TYPES = {
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".csv": "text/csv",
    ".png": "image/png",
    ".txt": "text/plain",
    ".tsv": "text/tab-separated-values",
    ".safetensors": "application/octet-stream",
    ".npy": "application/octet-stream",
}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def media_type_for(name: str, kind: str = "file") -> str:
    if kind == "folder":
        return "inode/directory"
    suffix = Path(name).suffix.lower()
    return _MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def safe_name(name: str) -> str:
    """A file-system- and header-safe rendering of a logical name (for archive roots and downloads)."""
    return _SAFE.sub("_", name).strip("._") or "artifact"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> list[tuple[str, int, str]]:
    """(relative posix path, size, sha256) of every file under `folder`, sorted; symlinks are refused."""
    entries: list[tuple[str, int, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise ValueError(f"artifact folder {folder} contains a symlink: {path.relative_to(folder)}")
            entries.append((path.relative_to(folder).as_posix(), path.stat().st_size, sha256_file(path)))
    entries.sort()
    return entries


def folder_digest(manifest: list[tuple[str, int, str]]) -> str:
    text = "".join(f"{rel}\t{size}\t{sha}\n" for rel, size, sha in manifest)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StoredObject:
    """Where an object lives in the store (`path` is relative to the store root)."""

    sha256: str
    size: int
    kind: str  # file | folder
    path: str
    files: int = 1


class ArtifactStore:
    """Content-addressed files and folders under `root` (default: the configured artifact dir)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or get_settings().artifacts)

    # -- paths -------------------------------------------------------------------------------------
    def _object_rel(self, sha: str, kind: str) -> str:
        return f"objects/{sha[:2]}/{sha}" + (".d" if kind == "folder" else "")

    def resolve(self, rel: str) -> Path:
        """The absolute path of a stored object; refuses anything outside the store."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"path {rel!r} escapes the artifact store")
        return path

    def _tmpdir(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    # -- writing -----------------------------------------------------------------------------------
    def put_stream(self, stream: IO[bytes], max_bytes: int | None = None) -> StoredObject:
        """Store the bytes of a readable stream (hashing while copying); ValueError past `max_bytes`."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmpdir(), prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ValueError(f"content exceeds {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            return self._publish_file(Path(tmp_name), digest.hexdigest(), size)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> StoredObject:
        return self.put_stream(io.BytesIO(data))

    def put_file(self, src: Path) -> StoredObject:
        with Path(src).open("rb") as fh:
            return self.put_stream(fh)

    def _publish_file(self, tmp: Path, sha: str, size: int) -> StoredObject:
        rel = self._object_rel(sha, "file")
        target = self.root / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        return StoredObject(sha, size, "file", rel)

    def put_folder(self, src: Path) -> StoredObject:
        """Store a folder tree (regular files only) under the digest of its manifest."""
        src = Path(src)
        if not src.is_dir():
            raise ValueError(f"not a folder: {src}")
        manifest = folder_manifest(src)
        sha = folder_digest(manifest)
        size = sum(s for _, s, _ in manifest)
        rel = self._object_rel(sha, "folder")
        target = self.root / rel
        if not target.exists():
            staging = Path(tempfile.mkdtemp(dir=self._tmpdir(), prefix="dir-"))
            try:
                for rel_file, _, _ in manifest:
                    dest = staging / rel_file
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / rel_file, dest)
                if folder_digest(folder_manifest(staging)) != sha:
                    raise RuntimeError(f"folder {src} changed while it was being stored")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(staging, target)
                except OSError:
                    if not target.exists():  # a concurrent writer published the same tree: fine
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return StoredObject(sha, size, "folder", rel, files=len(manifest))

    def put(self, src: Path) -> StoredObject:
        return self.put_folder(src) if Path(src).is_dir() else self.put_file(src)

    # -- reading -----------------------------------------------------------------------------------
    def archive(self, rel: str, sha: str, name: str, fmt: str = "tar.gz") -> Path:
        """A deterministic archive of a stored folder (cached); its single root folder is `name`."""
        if fmt not in ARCHIVE_FORMATS:
            raise ValueError(f"unknown archive format {fmt!r}; expected one of {ARCHIVE_FORMATS}")
        folder = self.resolve(rel)
        root_name = safe_name(name)
        out = self.root / "archives" / f"{sha}-{root_name}.{fmt}"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmpdir(), prefix="arc-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            files = [rel_file for rel_file, _, _ in folder_manifest(folder)]
            if fmt == "tar.gz":
                _write_tar_gz(tmp, folder, files, root_name)
            else:
                _write_zip(tmp, folder, files, root_name)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def delete(self, rel: str) -> None:
        """Remove a stored object and its cached archives (callers check no row still points at it)."""
        path = self.resolve(rel)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        sha = Path(rel).name.removesuffix(".d")
        for cached in (self.root / "archives").glob(f"{sha}-*"):
            cached.unlink(missing_ok=True)

    def iter_objects(self) -> Iterator[Path]:
        objects = self.root / "objects"
        if objects.is_dir():
            for bucket in sorted(objects.iterdir()):
                yield from sorted(bucket.iterdir())


def _write_tar_gz(out: Path, folder: Path, files: list[str], root_name: str) -> None:
    with (
        out.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        dirs = sorted({str(Path(f).parent) for f in files} - {"."})
        for d in [""] + dirs:
            info = tarfile.TarInfo(f"{root_name}/{d}".rstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for rel_file in files:
            path = folder / rel_file
            info = tarfile.TarInfo(f"{root_name}/{rel_file}")
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as fh:
                tar.addfile(info, fh)


def _write_zip(out: Path, folder: Path, files: list[str], root_name: str) -> None:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel_file in files:
            info = zipfile.ZipInfo(f"{root_name}/{rel_file}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with (folder / rel_file).open("rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, CHUNK)


# -- database records ------------------------------------------------------------------------------
def record_artifact(
    session: Any,
    stored: StoredObject,
    *,
    owner: str,
    name: str,
    job_id: str | None = None,
    stage: str | None = None,
    media_type: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Any:
    """The artifact row for (job, stage, name): created, or updated in place when re-ingested."""
    from sqlalchemy import select

    from shared.db.models import Artifact, new_id

    row = None
    if job_id is not None:
        row = session.scalars(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.stage == stage, Artifact.name == name)
        ).one_or_none()
    if row is None:
        row = Artifact(id=new_id("art"), owner=owner, job_id=job_id, stage=stage, name=name)
        session.add(row)
    row.kind = stored.kind
    row.sha256 = stored.sha256
    row.size_bytes = stored.size
    row.path = stored.path
    row.media_type = media_type or media_type_for(name, stored.kind)
    row.meta = {**(meta or {}), **({"files": stored.files} if stored.kind == "folder" else {})}
    session.flush()
    return row


def release_object(session: Any, store: ArtifactStore, sha: str, rel: str) -> bool:
    """Delete a stored object when no artifact row references its digest any more."""
    from sqlalchemy import func, select

    from shared.db.models import Artifact

    if session.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha)):
        return False
    store.delete(rel)
    return True
