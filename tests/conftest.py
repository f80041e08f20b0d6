"""Shared fixtures: the tiny model and the synthetic clips are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wan_assets.core.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "wan22-i2v-tiny")


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wan_assets.core.synthetic import write_sample_videos

    out = tmp_path_factory.mktemp("clips") / "clips"
    write_sample_videos(out)
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workdir with an example clips folder, used as WAN_ASSETS_HOME."""
    (tmp_path / "clips").mkdir()
    monkeypatch.setenv("WAN_ASSETS_HOME", str(tmp_path))
    return tmp_path
