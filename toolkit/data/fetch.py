"""Where prepared shards are read from: a local directory as it is, or remote files cached locally.

A location is a local directory (or its ``index.json``), any fsspec URL of one (``s3://bucket/set``,
``https://host/set/index.json``, ...), or a ``pipe:`` shell command with ``{name}`` where the file
name goes (``pipe:aws s3 cp s3://bucket/set/{name} -``), as WebDataset spells it.

Remote files land in a cache directory under a name that includes their SHA-256 (from the index), are
checked against it, and are renamed into place only once complete, so ranks and loader workers that
fetch the same shard at once each publish the same bytes. The cache keeps under ``max_bytes`` by
removing the least recently used shards (a reader that still has one open keeps reading it: POSIX
unlinks a file only once it is closed). :meth:`RemoteFiles.prefetch` fetches in background threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from toolkit.data.sources import DataError

logger = logging.getLogger(__name__)

PIPE = "pipe:"
CHUNK = 1 << 20


def is_remote(spec: str) -> bool:
    return spec.startswith(PIPE) or "://" in spec and not spec.startswith("file://")


def split_location(spec: str) -> str:
    """A location without a trailing ``index.json`` (or ``/``): what file names are joined to."""
    for suffix in ("/index.json", "index.json"):
        if spec.endswith(suffix) and not spec.startswith(PIPE):
            return spec[: -len(suffix)] or "."
    return spec.rstrip("/") if not spec.startswith(PIPE) else spec


class LocalFiles:
    """A prepared directory on a local (or shared) filesystem: files are read where they are."""

    def __init__(self, root: Path):
        self.root = root
        self.description = str(root)

    def path(self, name: str, key: str, sha256: str | None = None, size: int | None = None) -> Path:
        return self.root / name

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text()

    def prefetch(self, names: list[tuple[str, str, int]]) -> None:
        """Nothing to fetch."""


class RemoteFiles:
    """Files of a remote prepared directory, fetched on demand into a size-capped local cache."""

    def __init__(self, location: str, cache_dir: Path, max_bytes: int, threads: int = 2):
        self.location = location
        self.description = location
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create the shard cache {cache_dir} ({exc.strerror or exc})") from None

    def __getstate__(self) -> dict[str, object]:
        # Loader workers get the location and the cache, not this process's threads.
        return {**self.__dict__, "_pool": None, "_pending": {}, "_lock": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def url(self, name: str) -> str:
        if self.location.startswith(PIPE):
            return self.location.replace("{name}", name)
        return f"{self.location}/{name}"

    def read_text(self, name: str) -> str:
        """A small file (index, shard table), fetched without caching: it must be current."""
        return _fetch_bytes(self.url(name)).decode()

    def path(self, name: str, key: str, sha256: str | None = None, size: int | None = None) -> Path:
        """The local copy of ``name`` (cached under ``key``, a digest of its content): cached,
        being fetched in the background, or fetched now; checked against ``sha256`` and ``size``."""
        target = self.cache_dir / f"{key[:16]}-{name}"
        if target.is_file():
            os.utime(target)  # most recently used
            return target
        with self._lock:
            pending = self._pending.get(name)
        if pending is not None:
            return pending.result()
        return self._fetch(name, target, sha256, size)

    def prefetch(self, names: list[tuple[str, str, int]]) -> None:
        """Start fetching ``(name, sha256, size)`` files not cached yet, in background threads."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-prefetch")
            for name, sha256, size in names:
                target = self.cache_dir / f"{sha256[:16]}-{name}"
                if name not in self._pending and not target.is_file():
                    self._pending[name] = self._pool.submit(self._fetch, name, target, sha256, size)

    def _fetch(self, name: str, target: Path, sha256: str | None, size: int | None) -> Path:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        digest = hashlib.sha256()
        try:
            try:
                with _open_stream(self.url(name)) as stream, open(tmp, "wb") as out:
                    while block := stream.read(CHUNK):
                        digest.update(block)
                        out.write(block)
            except OSError as exc:
                raise DataError(f"cannot fetch {self.url(name)}: {exc}") from None
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise DataError(f"{self.url(name)}: fetched {got} bytes, the index says {size}")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise DataError(f"{self.url(name)}: its SHA-256 is not the index's (a changed or corrupt shard)")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._pending.pop(name, None)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        files = [p for p in self.cache_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
        total = sum(p.stat().st_size for p in files)
        for path in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


def _fetch_bytes(url: str) -> bytes:
    try:
        with _open_stream(url) as stream:
            return stream.read()
    except OSError as exc:
        raise DataError(f"cannot read {url}: {exc}") from None


class _PipeStream:
    """A ``pipe:`` command's stdout as a readable file; a non-zero exit is a :class:`DataError`."""

    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        assert self.process.stdout is not None
        return self.process.stdout.read(n)

    def __enter__(self) -> _PipeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process.stdout is not None and self.process.stderr is not None
        self.process.stdout.close()  # read to the end already, unless an error is on its way out
        error = self.process.stderr.read().decode(errors="replace").strip().splitlines()
        if self.process.wait() != 0 and exc[0] is None:
            raise DataError(f"{self.command!r} exited with {self.process.returncode}: {error[-1] if error else ''}")


def _open_stream(url: str):  # noqa: ANN202 - a binary file-like object
    if url.startswith(PIPE):
        return _PipeStream(url[len(PIPE):])
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"cannot read {url}: {exc}") from None


def open_location(spec: str, cache_dir: Path, max_bytes: int) -> LocalFiles | RemoteFiles:
    """The files of the prepared directory ``spec`` (local path, fsspec URL or ``pipe:`` command)."""
    location = split_location(spec)
    if is_remote(spec):
        key = hashlib.sha256(location.encode()).hexdigest()[:16]
        return RemoteFiles(location, cache_dir / key, max_bytes)
    return LocalFiles(Path(location.removeprefix("file://")).expanduser())
