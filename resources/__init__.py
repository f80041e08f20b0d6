"""Dagster resources: infrastructure only (where things live, which config, how to launch)."""

from resources.launcher import TrainingLauncher
from resources.project import WanProjectResource

__all__ = ["TrainingLauncher", "WanProjectResource"]
