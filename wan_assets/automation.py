"""Automation (docs/architecture.md §4, §11): new clips flow through on their own, training follows the data nightly.

- the new-clip sensor adds partitions and runs the per-clip assets of new or changed clips (clip
  bytes or caption file) in batches; it is their only trigger, so a clip never runs alone by
  accident and a failed clip is not retried until its files change;
- the latent index follows its clips;
- the LoRAs retrain when the latent cache changed, on a cron tick (WAN_ASSETS_RETRAIN_CRON,
  default 02:00 nightly), or whenever materialized by hand;
- evaluation runs after training (eager) and on its own schedule (WAN_ASSETS_EVAL_CRON).

The crons are deployment settings: definitions.py reads them once and builds the retraining condition
and the evaluation schedule from them here.
"""

from dagster import (
    AssetsDefinition,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    ScheduleDefinition,
    define_asset_job,
)

DEFAULT_RETRAIN_CRON = "0 2 * * *"
DEFAULT_EVAL_CRON = "0 6 * * *"

# The index follows its clips, also when some clips failed (eager() would wait on missing ones).
INDEX = (
    AutomationCondition.any_deps_updated().since_last_handled()
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


def retrain_condition(cron: str) -> AutomationCondition:
    """At each tick of `cron`, retrain if the latent cache changed since this asset was last handled."""
    return (
        AutomationCondition.cron_tick_passed(cron)
        & AutomationCondition.any_deps_updated().since_last_handled()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    )


def retrain_on_cron(training: AssetsDefinition, cron: str) -> AssetsDefinition:
    """The training assets with the retraining condition of `cron` on each of their LoRAs."""
    condition = retrain_condition(cron)
    return training.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=condition))


def evaluation_schedule(cron: str) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="evaluate_checkpoints",
        target=AssetSelection.assets("evaluated_checkpoints"),
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.RUNNING,
    )
