"""The Dagster code location `wan_assets` (workspace.yaml points here)."""

from dagster import Definitions

from resources.launcher import TrainingLauncher
from resources.project import WanProjectResource
from wan_assets.assets.data import captions, latent_cache, latents, raw_videos
from wan_assets.assets.training import evaluated_checkpoints, lora_training
from wan_assets.sensors import new_clips_sensor

ASSETS = [raw_videos, captions, latents, latent_cache, lora_training, evaluated_checkpoints]


def resources() -> dict:
    return {"project": WanProjectResource(), "launcher": TrainingLauncher()}


defs = Definitions(
    assets=ASSETS,
    sensors=[new_clips_sensor],
    resources=resources(),
)
