"""A checkpoint's manifest: every file with its size and SHA-256, written last.

A checkpoint directory is complete and intact exactly when its manifest is there and every file
matches it, with no file the manifest does not list. That catches a truncated weight file, a torn
``trainer_state.json`` and a file planted later (say a pickle named like one accelerate loads):
:func:`verify` names what is wrong, and resume falls back to an older checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 8 * 2**20


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """List every file below ``directory``; call once everything else is written (all ranks done)."""
    entries = {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _digest(path)}
        for path in _files(directory)
    }
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as handle:
        json.dump({"files": entries}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(directory / MANIFEST)


def verify(directory: Path) -> str | None:
    """What is wrong with the checkpoint in ``directory``, or None when it matches its manifest."""
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({exc})"
    present = {str(p.relative_to(directory)): p for p in _files(directory)}
    for name, entry in listed.items():
        path = present.pop(name, None)
        if path is None:
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
        if _digest(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    if present:
        return f"unexpected file(s) not written by the toolkit: {', '.join(sorted(present))}"
    return None
