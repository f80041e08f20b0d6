"""Atomic file writes: a crash mid-save never leaves a file that parses as complete (docs/architecture.md §5.1).

Every write goes to a hidden temporary name next to its target and is renamed over it once
complete, with the permissions of an ordinary file under the process's umask (ComfyUI running as
another user must be able to read a LoRA). A full disk ends every writer the same way: one
`DiskFullError` naming the file and the space it needed and found.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wan_assets.core.errors import DiskFullError

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_UMASK_LOCK = threading.Lock()


def temp_name(path: Path) -> Path:
    """`.<name>.<uuid>.tmp`: hidden, so clip discovery and checkpoint globs never see it."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


@contextmanager
def atomic_output(path: Path, *, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one step.

    Readers (and the sensor that scans dataset folders) never see a half-written file; the hidden
    `.tmp` name keeps it out of clip discovery meanwhile. `needed_bytes`, when the caller knows it,
    goes into the disk-full message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_name(path)
    try:
        yield tmp_path
        # Some writers (safetensors) create their file 0600 whatever the umask.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno not in FULL_DISK_ERRNOS or isinstance(exc, DiskFullError):
            raise
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        tmp_path.unlink(missing_ok=True)  # what it held is free again: report the space a retry has
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(path, free_bytes=free, needed_bytes=needed_bytes, written_bytes=written) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere os.umask must set it to read it, so
    that is done under a lock (other threads of this module never see the interim value)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_output(path, needed_bytes=len(data)) as tmp, tmp.open("wb") as handle:
        handle.write(data)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def create_text(path: Path, text: str) -> bool:
    """Write `path` only if nothing is there, never over a file (a user's caption, say), appearing
    whole. False when a file was there already; a file that appears meanwhile also wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_name(path)
    try:
        tmp_path.write_bytes(text.encode("utf-8"))
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.link(tmp_path, path)  # unlike a rename, a link refuses an existing target
    except FileExistsError:
        return False
    finally:
        tmp_path.unlink(missing_ok=True)
    return True


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    # To bytes, then written here: safetensors' own file writer reports a full disk as a
    # SafetensorError without errno (and makes the file 0600).
    from safetensors.torch import save  # torch only for callers that write tensors

    return write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
