"""One run per output directory: an advisory lock on ``output.dir/.lock``, held by rank 0.

Two runs on one directory would interleave ``metrics.jsonl`` and overwrite each other's
checkpoints. ``fcntl.flock`` is released by the kernel when the holder dies, so a killed run never
leaves a stale lock behind; the file records who holds it, for the message the second run prints.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from toolkit.config import ConfigError

LOCK_FILE = ".lock"


class OutputLock:
    """``with OutputLock(out):`` or :meth:`acquire`/:meth:`release`; raises :class:`ConfigError` when held."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.handle: IO[str] | None = None

    def acquire(self) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"output.dir {self.path.parent} is in use by another run ({holder}); wait for it to finish, "
                "or use another output.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = dt.datetime.now().isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": started}))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
