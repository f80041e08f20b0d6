"""Faults lose nothing and stop nothing (DESIGN 5.1, issue 14): kills at any point, a second trainer,
a corrupt checkpoint, a full disk, a partial cache, file modes, readers of the metrics database."""

from __future__ import annotations

import errno
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_assets.core.errors import DiskFullError
from wan_assets.core.files import write_json, write_safetensors, write_text
from wan_assets.core.run_files import load_state, save_state

# --- file modes ---------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_files_get_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    written = [
        write_safetensors(tmp_path / "lora.safetensors", {"w": torch.ones(3)}),
        save_state(tmp_path / "x_state.pt", {"step": 1}),
        write_json(tmp_path / "a.json", {"a": 1}),
    ]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert torch.equal(load_file(str(written[0]))["w"], torch.ones(3))
    assert load_state(written[1]) == {"step": 1}


# --- a full disk ----------------------------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes, as the kernel reports it (ENOSPC)."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.handle.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every temporary file of an atomic write takes 100 bytes, then the disk is full."""
    real_open = Path.open

    def open_(self: Path, mode: str = "r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return _FullDisk(handle, 100) if self.name.endswith(".tmp") and "w" in mode else handle

    monkeypatch.setattr(Path, "open", open_)


def _write_each_kind(folder: Path) -> dict[str, object]:
    return {
        "lora.safetensors": lambda: write_safetensors(folder / "lora.safetensors", {"w": torch.ones(20_000)}),
        "x_state.pt": lambda: save_state(folder / "x_state.pt", {"w": torch.ones(20_000)}),
        "config.yaml": lambda: write_text(folder / "config.yaml", "x" * 100_000),
    }


def test_a_full_disk_is_one_error_naming_the_file(tmp_path: Path, full_disk: None) -> None:
    for name, write in _write_each_kind(tmp_path).items():
        with pytest.raises(DiskFullError) as info:
            write()
        error = info.value
        assert error.errno == errno.ENOSPC and error.filename == str(tmp_path / name)
        assert f"disk full while writing {tmp_path / name}: " in str(error) and " is free there" in str(error)
        assert "\n" not in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-written file, no temp file


def test_the_cli_prints_a_full_disk_as_one_line(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path, full_disk: None, capsys
) -> None:
    import yaml

    from wan_assets.cli import main

    from .test_train import job_raw

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_raw(clips_dir, tiny_model_dir, tmp_path / "out", steps=2)))
    assert main(["train", str(config), "--workdir", str(tiny_cache)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full while writing "), err


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 kB filesystem (tmpfs; needs root, else skipped)."""
    folder = tmp_path / "small"
    if not _mount_tmpfs(folder, "64k"):
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk_is_the_same_error(small_disk: Path) -> None:
    for name, write in _write_each_kind(small_disk).items():
        with pytest.raises(DiskFullError) as info:
            write()
        assert info.value.filename == str(small_disk / name)
        assert "needs" in str(info.value) or "failed after" in str(info.value)
    assert sorted(p.name for p in small_disk.iterdir()) == []
