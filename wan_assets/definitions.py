"""The Dagster code location `wan_assets` (workspace.yaml points here)."""

import os

from dagster import Definitions

from resources.launcher import TrainingLauncher
from resources.project import WanProjectResource
from wan_assets.assets.data import captions, latent_cache, latents, raw_videos
from wan_assets.assets.metrics import training_metrics
from wan_assets.assets.training import evaluated_checkpoints, lora_training
from wan_assets.automation import automation_sensor, evaluation_schedule, train_and_evaluate
from wan_assets.sensors import new_clips_sensor

ASSETS = [raw_videos, captions, latents, latent_cache, lora_training, evaluated_checkpoints, training_metrics]


def resources() -> dict:
    # WAN_ASSETS_TRAIN_PROCS > 1 trains data parallel under torchrun, one process per GPU.
    procs = int(os.environ.get("WAN_ASSETS_TRAIN_PROCS", "1"))
    return {"project": WanProjectResource(), "launcher": TrainingLauncher(nproc_per_node=procs)}


defs = Definitions(
    assets=ASSETS,
    sensors=[new_clips_sensor, automation_sensor],
    schedules=[evaluation_schedule],
    jobs=[train_and_evaluate],
    resources=resources(),
)
