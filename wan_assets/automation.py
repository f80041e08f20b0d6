"""Automation (docs/architecture.md §4, §11): new clips flow through on their own, training follows the data nightly.

- the new-clip sensor adds partitions and runs each new or changed clip's per-clip assets;
- captions/latents re-run when their upstream changes (eager), the latent index follows its clips;
- the LoRAs retrain when the latent cache changed, on a cron tick (WAN_ASSETS_RETRAIN_CRON,
  default 02:00 nightly), or whenever materialized by hand;
- evaluation runs after training (eager) and on its own schedule (WAN_ASSETS_EVAL_CRON).
"""

import os

from dagster import (
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    ScheduleDefinition,
    define_asset_job,
)

RETRAIN_CRON = os.environ.get("WAN_ASSETS_RETRAIN_CRON", "0 2 * * *")
EVAL_CRON = os.environ.get("WAN_ASSETS_EVAL_CRON", "0 6 * * *")

# Per-clip assets downstream of raw_videos re-run when their upstream changes.
PER_CLIP = AutomationCondition.eager()
# The index follows its clips, also when some clips failed (eager() would wait on missing ones).
INDEX = (
    AutomationCondition.any_deps_updated().since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
)
# At each cron tick, retrain if the latent cache changed since this asset was last handled.
RETRAIN = (
    AutomationCondition.cron_tick_passed(RETRAIN_CRON)
    & AutomationCondition.any_deps_updated().since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
)
EVALUATE = AutomationCondition.eager()

automation_sensor = AutomationConditionSensorDefinition(
    "automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

train_and_evaluate = define_asset_job(
    "train_and_evaluate",
    selection=AssetSelection.groups("training"),
    description="Train both experts from the current latent cache, evaluate, load the metrics",
)

evaluation_schedule = ScheduleDefinition(
    name="evaluate_checkpoints",
    target=AssetSelection.assets("evaluated_checkpoints"),
    cron_schedule=EVAL_CRON,
    default_status=DefaultScheduleStatus.RUNNING,
)
