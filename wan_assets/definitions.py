"""The Dagster code location `wan_assets` (workspace.yaml points here).

Every deployment setting is read here, once, from the environment (`settings()`), and becomes a
resource field or the cron of a schedule or automation condition, so the UI shows what is in force.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dagster import Definitions, in_process_executor

from resources.launcher import TrainingLauncher
from resources.project import WanProjectResource
from wan_assets.assets.data import DEFAULT_BATCH_CLIPS, clip_assets, clip_batches, latent_cache
from wan_assets.assets.metrics import training_metrics
from wan_assets.assets.training import evaluated_checkpoints, lora_training
from wan_assets.automation import (
    DEFAULT_EVAL_CRON,
    DEFAULT_RETRAIN_CRON,
    automation_sensor,
    evaluation_schedule,
    retrain_on_cron,
    train_and_evaluate,
)
from wan_assets.core.workdir import TINY_CONFIG
from wan_assets.sensors import clip_batches_job, new_clips_sensor_for


@dataclass(frozen=True)
class Settings:
    """The deployment's settings (each from the environment variable named beside it)."""

    config_path: str = str(TINY_CONFIG)  # WAN_ASSETS_CONFIG: the job config the graph runs
    workdir: str = ""  # WAN_ASSETS_HOME: latent cache, runs, metrics database; "" is ./.wan_assets
    train_procs: int = 1  # WAN_ASSETS_TRAIN_PROCS > 1: data parallel under torchrun, one process per GPU
    retrain_cron: str = DEFAULT_RETRAIN_CRON  # WAN_ASSETS_RETRAIN_CRON: when a changed cache retrains
    eval_cron: str = DEFAULT_EVAL_CRON  # WAN_ASSETS_EVAL_CRON: when checkpoints are re-scored
    batch_clips: int = DEFAULT_BATCH_CLIPS  # WAN_ASSETS_BATCH_CLIPS: clips per run of the per-clip assets


def settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings in force: the environment's, else the defaults."""
    default = Settings()
    return Settings(
        config_path=environ.get("WAN_ASSETS_CONFIG") or default.config_path,
        # Resolved as `wan-assets --workdir`'s default resolves it (core.config.default_workdir).
        workdir=str(Path(environ["WAN_ASSETS_HOME"]).resolve()) if environ.get("WAN_ASSETS_HOME") else "",
        train_procs=int(environ.get("WAN_ASSETS_TRAIN_PROCS", str(default.train_procs))),
        retrain_cron=environ.get("WAN_ASSETS_RETRAIN_CRON", default.retrain_cron),
        eval_cron=environ.get("WAN_ASSETS_EVAL_CRON", default.eval_cron),
        batch_clips=int(environ.get("WAN_ASSETS_BATCH_CLIPS", str(default.batch_clips))),
    )


def resources(deployment: Settings | None = None) -> dict:
    deployment = deployment or settings()
    return {
        "project": WanProjectResource(config_path=deployment.config_path, workdir=deployment.workdir),
        "launcher": TrainingLauncher(nproc_per_node=deployment.train_procs),
    }


SETTINGS = settings()
ASSETS = [
    clip_assets.with_attributes(backfill_policy=clip_batches(SETTINGS.batch_clips)),
    latent_cache,
    retrain_on_cron(lora_training, SETTINGS.retrain_cron),
    evaluated_checkpoints,
    training_metrics,
]

defs = Definitions(
    assets=ASSETS,
    sensors=[new_clips_sensor_for(SETTINGS.batch_clips), automation_sensor],
    schedules=[evaluation_schedule(SETTINGS.eval_cron)],
    jobs=[train_and_evaluate, clip_batches_job],
    resources=resources(SETTINGS),
    # Every run here is a chain of steps (clips -> index -> training -> evaluation -> metrics) and
    # training itself runs out of process (Pipes): a subprocess per step would only re-import
    # Python, torch and this code location. Pools (`gpu`) still apply per step.
    executor=in_process_executor,
)
