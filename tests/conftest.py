"""Shared fixtures: the tiny model and the synthetic clips are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wan_assets.core.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "wan22-i2v-tiny")


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wan_assets.core.data.synthetic import write_sample_videos

    out = tmp_path_factory.mktemp("clips") / "clips"
    write_sample_videos(out)
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workdir with an example clips folder, used as WAN_ASSETS_HOME."""
    (tmp_path / "clips").mkdir()
    monkeypatch.setenv("WAN_ASSETS_HOME", str(tmp_path))
    return tmp_path


def tiny_job_raw(clips: Path, model: Path, **train) -> dict:
    """The tiny CPU config pointed at test folders, with `train` keys overridden."""
    import yaml

    raw = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    process = raw["config"]["process"][0]
    process["model"]["name_or_path"] = str(model)
    process["datasets"][0]["folder_path"] = str(clips)
    process["train"].update(train)
    return raw


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, clips_dir: Path) -> Path:
    """A workdir whose cache/ holds the tiny config's latents of the synthetic clips."""
    from wan_assets.core.config import parse_config
    from wan_assets.core.data.cache import EncoderHandle, cache_dataset

    workdir = tmp_path_factory.mktemp("cached")
    job = parse_config(tiny_job_raw(clips_dir, tiny_model_dir), workdir=workdir).job
    report = cache_dataset(job, workdir / "cache", EncoderHandle(str(tiny_model_dir)))
    assert not report.failures, report.failures
    return workdir
