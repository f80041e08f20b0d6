"""Faults lose nothing and stop nothing (docs/architecture.md §5.1, issue 14): kills at any point, a second trainer,
a corrupt checkpoint, a full disk, a partial cache, file modes, readers of the metrics database."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from wan_assets.core.config import parse_config
from wan_assets.core.data.cache import EncoderHandle, cache_dataset, index_path
from wan_assets.core.errors import DiskFullError, TrainingError
from wan_assets.core.files import is_temp_name, write_json, write_safetensors, write_text
from wan_assets.core.train.loop import train
from wan_assets.core.train.metrics_log import read_lines
from wan_assets.core.train.run_files import LOCK_NAME, RunFiles, claim, load_state, save_state

from .conftest import tiny_job_raw
from .test_train import job_raw, lora_tensors, losses, run_cli

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
    from wan_assets.cli import main

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


# --- kills, a second trainer, a corrupt checkpoint ----------------------------------------------------


def _job(tmp_path: Path, clips: Path, model: Path, cache: Path, folder: str, *, save_every: int, **train):
    raw = job_raw(clips, model, tmp_path / folder, **train)
    raw["config"]["process"][0]["save"] = {
        "dtype": "fp32",
        "save_every": save_every,
        "max_step_saves_to_keep": 10,
    }
    config = tmp_path / f"{folder}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_config(raw, workdir=cache).job, config


def _wait_for_lines(proc: subprocess.Popen, files: RunFiles, num_lines: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if files.metrics.exists() and len(read_lines(files.metrics)) >= num_lines:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before {num_lines} steps:\n{proc.stdout.read()}")


def _assert_same_run(files: RunFiles, reference: RunFiles, experts: tuple[str, ...]) -> None:
    assert losses(files.metrics) == losses(reference.metrics)
    ours, theirs = lora_tensors(files, experts), lora_tensors(reference, experts)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_a_run_killed_before_its_first_checkpoint_resumes_afresh(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    args = (tmp_path, clips_dir, tiny_model_dir, tiny_cache)
    ref_job, _ = _job(*args, "ref", save_every=100, steps=30)
    reference = train(ref_job, tiny_cache / "cache")
    job, config = _job(*args, "killed", save_every=100, steps=30)
    files = RunFiles.of(job)
    proc = run_cli(config, tiny_cache)
    _wait_for_lines(proc, files, 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert files.complete_steps(job.experts) == [] and files.metrics.stat().st_size > 0
    # The training asset's retry: what TrainingLauncher.command runs.
    resumed = run_cli(config, tiny_cache, "--resume", "--restart-on-new-data")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert "no checkpoint to resume" in out and "starts afresh" in out
    _assert_same_run(files, reference.files, job.experts)
    assert not any(is_temp_name(p.name) for p in files.root.iterdir())


def test_one_trainer_per_run_folder(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    job, config = _job(tmp_path, clips_dir, tiny_model_dir, tiny_cache, "run", save_every=5, steps=5000)
    files = RunFiles.of(job)
    first = run_cli(config, tiny_cache)
    _wait_for_lines(first, files, 6)
    try:
        for resume_run in (False, True):
            with pytest.raises(TrainingError, match=rf"in use by another trainer \(PID {first.pid} on "):
                train(job, tiny_cache / "cache", resume_run=resume_run, stop_after=1)
        assert first.poll() is None, "the first trainer goes on"
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # Its lock file stays behind, naming a dead process: the next trainer takes it over.
    assert (files.root / LOCK_NAME).read_text().startswith(f"{first.pid} ")
    step = files.complete_steps(job.experts)[-1]
    result = train(job, tiny_cache / "cache", resume_run=True, stop_after=step + 1)
    assert result.files.root == files.root and len(read_lines(files.metrics)) == step + 1
    assert (files.root / LOCK_NAME).read_text().startswith(f"{os.getpid()} ")
    with claim(files):  # released when train returned
        pass


def test_the_lock_is_released_when_training_fails(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    job, _ = _job(tmp_path, clips_dir, tiny_model_dir, tiny_cache, "run", save_every=5, steps=2)
    files = RunFiles.of(job)
    files.root.mkdir(parents=True)
    files.metrics.write_text("")
    with pytest.raises(TrainingError, match="pass --resume"):
        train(job, tiny_cache / "cache")
    with claim(files), pytest.raises(TrainingError, match=rf"in use by another trainer \(PID {os.getpid()} "):
        train(job, tiny_cache / "cache", resume_run=True)


def test_resume_skips_a_corrupt_newest_checkpoint_and_removes_stale_temp_files(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path, capsys
) -> None:
    args = (tmp_path, clips_dir, tiny_model_dir, tiny_cache)
    reference = train(_job(*args, "ref", save_every=2, steps=8)[0], tiny_cache / "cache")
    job, _ = _job(*args, "broken", save_every=2, steps=8)
    files = RunFiles.of(job)
    train(job, tiny_cache / "cache", stop_after=6)
    state = files.state(6)
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a disk that lost the tail
    stale = [
        files.root / f".{files.lora('high_noise', 8).name}.{uuid.uuid4().hex}.tmp",
        files.samples / ".x.mp4.0.tmp",
    ]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    capsys.readouterr()
    train(job, tiny_cache / "cache", resume_run=True)
    err = capsys.readouterr().err
    assert "checkpoint at step 6 does not load, skipped: " in err and "resumed tiny_i2v_lora at step 4" in err
    assert not any(p.exists() for p in stale)
    _assert_same_run(files, reference.files, job.experts)


# --- the latent cache never shrinks by accident ---------------------------------------------------------


def test_a_cache_run_that_loses_its_clips_keeps_the_index(
    tmp_path: Path, clips_dir: Path, tiny_model_dir: Path, capsys
) -> None:
    clips = Path(shutil.copytree(clips_dir, tmp_path / "clips"))
    job = parse_config(tiny_job_raw(clips, tiny_model_dir, steps=1), workdir=tmp_path).job
    cache, encoder = tmp_path / "cache", EncoderHandle(str(tiny_model_dir))
    good = cache_dataset(job, cache, encoder)
    assert not good.failures
    good_index = index_path(cache, job).read_text()

    def move_folder_away_after(num_clips: int):
        def progress(sources):
            for i, source in enumerate(sources):
                if i == num_clips:
                    clips.rename(tmp_path / "moved")
                yield source

        return progress

    partial = cache_dataset(job, cache, encoder, move_folder_away_after(3), prefetch=0)
    assert len(partial.failures) == len(good.index.clips) - 3
    assert sorted(partial.kept) == sorted(partial.failures)  # every failed clip kept its good entry
    assert index_path(cache, job).read_text() == good_index

    (tmp_path / "moved").rename(clips)
    removed = sorted(clips.glob("*.mp4"))[0]
    removed.unlink()  # on purpose: it leaves the index
    smaller = cache_dataset(job, cache, encoder)
    assert not smaller.failures and set(smaller.index.clips) == set(good.index.clips) - {removed.name}

    capsys.readouterr()
    result = train(job, cache)
    data = json.loads(result.files.data.read_text())
    num_train = sum(1 for split in smaller.index.splits.values() if split == "train")
    # One window at one pixel budget per clip, cache_variants: 2.
    assert (data["num_clips"], data["num_samples"], data["num_cached_variants"]) == (
        num_train,
        num_train,
        2 * num_train,
    )
    assert (
        f"training on {num_train} clips ({num_train} samples, {2 * num_train} cached variants"
        in capsys.readouterr().err
    )


# --- fault injection: kill a real trainer anywhere, resume, get the uninterrupted run -----------------

# `wan-assets train` that SIGKILLs itself at one point: inside the save of a named file (half of
# its temporary file written, not renamed yet) or in the middle of writing a step's JSONL line.
DIE_AT = """
import os, signal, sys
from pathlib import Path

kind, at = sys.argv[1], sys.argv[2]
if kind == "file":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == at:
            os.truncate(src, Path(src).stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
else:
    from wan_assets.core.train import metrics_log

    real_write = metrics_log.MetricsLog.write

    def write(self, record):
        if record["step"] == int(at):
            line = metrics_log.format_line(record)
            self._handle.write(line[: len(line) // 2])
            self._handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, record)

    metrics_log.MetricsLog.write = write

from wan_assets.cli import main

sys.exit(main(sys.argv[3:]))
"""

NUM_STEPS, SAVE_EVERY = 16, 4


def _timeline(files: RunFiles) -> list[tuple[str, str]]:
    """The kill points of an uninterrupted run, in the order it reaches them."""
    points = [("file", files.config.name)]
    for step in range(NUM_STEPS):
        points.append(("line", str(step)))
        if (step + 1) % SAVE_EVERY == 0:
            saved = files.checkpoint_files(step + 1, ("high_noise", "low_noise"))
            points += [("file", p.name) for p in saved]
    finals = [files.lora(e, ema=ema).name for e in ("high_noise", "low_noise") for ema in (False, files.ema)]
    return points + [("file", name) for name in dict.fromkeys(finals)]


NUM_KILLS = 20


def _kill_points(files: RunFiles, seed: int) -> list[tuple[str, str]]:
    """NUM_KILLS points of the run's timeline: always one before the first checkpoint, one inside
    each kind of checkpoint file (one per checkpoint, in a random order) and one inside a final
    LoRA; the rest drawn at random from every other step line and file save."""
    rng = random.Random(seed)
    kinds = ["high_noise.safetensors", "low_noise.safetensors", "alpha_scheduler.json", "state.pt"]
    rng.shuffle(kinds)
    chosen = {("line", str(rng.randrange(SAVE_EVERY)))}
    for i, kind in enumerate(kinds, 1):
        chosen.add(("file", f"{files.name}_{i * SAVE_EVERY:09d}_{kind}"))
    chosen.add(("file", files.lora(rng.choice(["high_noise", "low_noise"])).name))
    timeline = _timeline(files)
    assert chosen <= set(timeline)
    rest = [point for point in timeline if point not in chosen]
    chosen |= set(rng.sample(rest, NUM_KILLS - len(chosen)))
    return sorted(chosen, key=timeline.index)


def test_killed_anywhere_resumes_to_the_same_run(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    args = (tmp_path, clips_dir, tiny_model_dir, tiny_cache)
    # With EMA weights and a warm-up schedule, whose state must survive every kill point too.
    common = dict(
        save_every=SAVE_EVERY,
        steps=NUM_STEPS,
        switch_boundary_every=3,
        ema_config={"use_ema": True, "ema_decay": 0.9},
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=6,
    )
    reference = train(_job(*args, "ref", **common)[0], tiny_cache / "cache").files
    job, config = _job(*args, "killed", **common)
    files = RunFiles.of(job)
    cli = ["train", str(config), "--workdir", str(tiny_cache)]
    for i, (kind, at) in enumerate(_kill_points(files, seed=14)):
        resume = ["--resume"] if i else []
        done = subprocess.run(
            [sys.executable, "-c", DIE_AT, kind, at, *cli, *resume], capture_output=True, text=True
        )
        assert done.returncode == -signal.SIGKILL, (kind, at, done.stdout, done.stderr)
        logged = losses(files.metrics) if files.metrics.exists() else []
        assert logged == losses(reference.metrics)[: len(logged)], (kind, at)  # what it logged is the truth
    done = subprocess.run(
        [sys.executable, "-m", "wan_assets.cli", *cli, "--resume"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    _assert_same_run(files, reference, job.experts)
    assert files.complete_steps(job.experts) == reference.complete_steps(job.experts)
    for step in [*files.complete_steps(job.experts), None]:
        for expert in job.experts:
            for ema in (False, True):
                ours, theirs = (
                    load_file(str(files.lora(expert, step, ema=ema))),
                    load_file(str(reference.lora(expert, step, ema=ema))),
                )
                assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (step, expert, ema)
    assert not any(is_temp_name(p.name) for p in files.root.iterdir())
