"""The workdir (docs/architecture.md §8): latent cache, metrics database, Dagster instance, runs and example data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wan_assets.core.config import default_workdir

TINY_MODEL_DIRNAME = "models/wan22-i2v-tiny"
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_CONFIG = REPO_CONFIGS / "tiny_cpu.yaml"


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def open(cls, path: str | Path | None = None) -> Workdir:
        root = Path(path).resolve() if path is not None else default_workdir()
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"workdir {root} is a file, not a folder; pass --workdir DIR")
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def clips(self) -> Path:
        return self.root / "clips"

    @property
    def tiny_model(self) -> Path:
        return self.root / TINY_MODEL_DIRNAME

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's caches (inductor's graphs and kernels, Triton's binaries, dynamo's profiles),
        kept across runs so a second run of a config skips the compile (bench/README.md, warm-up)."""
        return self.root / "compile_cache"

    @property
    def database(self) -> Path:
        return self.root / "metrics.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    def ensure_default_clips(self, config_path: str | Path) -> None:
        """The synthetic clips when `config_path` is the embedded default (they are its dataset).

        Any other config brings its own clips: nothing is ever written into a user's dataset folder.
        """
        if is_default_config(config_path):
            self.ensure_sample_clips()

    def ensure_sample_clips(self) -> Path:
        """The synthetic clip set of the embedded default config, written once."""
        from wan_assets.core.data.synthetic import write_sample_videos

        if not self.clips.is_dir() or not any(self.clips.iterdir()):
            write_sample_videos(self.clips)
        return self.clips

    def builds_model(self, name_or_path: str) -> bool:
        """Whether `name_or_path` is the embedded tiny model, built here on first use."""
        return Path(name_or_path) == self.tiny_model

    def ensure_model(self, name_or_path: str) -> str:
        """Build the embedded tiny model when a config points at it and it is not there yet."""
        if self.builds_model(name_or_path):
            self.ensure_tiny_model()
        return name_or_path

    def ensure_tiny_model(self) -> Path:
        """The embedded tiny Wan 2.2 I2V model, built once (atomically: a folder appears whole)."""
        from wan_assets.core.model.tiny import build_tiny_model

        if not (self.tiny_model / "model_index.json").is_file():
            build_tiny_model(self.tiny_model)
        return self.tiny_model


def is_default_config(config_path: str | Path) -> bool:
    """Whether `config_path` is the embedded default config (configs/tiny_cpu.yaml)."""
    return Path(config_path).resolve() == TINY_CONFIG.resolve()
