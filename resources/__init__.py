"""Dagster resources: infrastructure only (where things live, which config, how to launch)."""

from resources.project import WanProjectResource

__all__ = ["WanProjectResource"]
