"""Automation conditions: a new clip flows to the index, a changed cache retrains at the cron tick."""

from __future__ import annotations

import datetime

from dagster import AssetKey, AssetMaterialization, evaluate_automation_conditions, instance_for_test

from wan_assets.definitions import defs


def _materialize(instance, key: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(AssetMaterialization(asset_key=key, partition=partition))


def _requested(result, key: str) -> set:
    return (
        {str(p) for p in result.get_requested_partitions(AssetKey(key))}
        if result.get_num_requested(AssetKey(key))
        else set()
    )


def test_new_clip_flows_through_to_the_index() -> None:
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("videos", ["a.mp4", "b.mp4"])
        first = evaluate_automation_conditions(defs=defs, instance=instance)
        # raw_videos is the sensor's to request; nothing downstream runs while it is missing.
        assert first.get_num_requested(AssetKey("raw_videos")) == 0
        assert first.get_num_requested(AssetKey("captions")) == 0

        _materialize(instance, "raw_videos", "a.mp4")
        second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        # The per-clip assets are the new-clip sensor's to request, in batches: automation never
        # starts a one-clip run behind it (nor retries a clip whose file is at fault).
        assert second.get_num_requested(AssetKey("captions")) == 0
        assert second.get_num_requested(AssetKey("latents")) == 0
        assert second.get_num_requested(AssetKey("latent_cache")) == 0

        _materialize(instance, "captions", "a.mp4")
        _materialize(instance, "latents", "a.mp4")
        fourth = evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
        # b.mp4 never materialized (say it failed): the index still follows the clips that did.
        assert fourth.get_num_requested(AssetKey("latent_cache")) == 1
        assert fourth.get_num_requested(AssetKey("lora_high_noise")) == 0  # training waits for its cron tick

        fifth = evaluate_automation_conditions(defs=defs, instance=instance, cursor=fourth.cursor)
        assert fifth.get_num_requested(AssetKey("latent_cache")) == 0  # handled once, not every tick


def test_changed_latent_cache_retrains_at_the_cron_tick_and_evaluation_follows() -> None:
    with instance_for_test() as instance:
        day = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)

        def tick(at: datetime.datetime, previous=None):
            cursor = previous.cursor if previous is not None else None
            return evaluate_automation_conditions(
                defs=defs, instance=instance, cursor=cursor, evaluation_time=at
            )

        result = tick(day)
        _materialize(instance, "latent_cache")
        result = tick(day + datetime.timedelta(hours=13), result)  # 01:00: before the 02:00 tick
        assert result.get_num_requested(AssetKey("lora_high_noise")) == 0
        result = tick(day + datetime.timedelta(hours=14, minutes=5), result)  # 02:05
        assert result.get_num_requested(AssetKey("lora_high_noise")) == 1
        assert result.get_num_requested(AssetKey("lora_low_noise")) == 1
        # Evaluation rides along in the same run, after training.
        assert result.get_num_requested(AssetKey("evaluated_checkpoints")) == 1

        for key in ("lora_high_noise", "lora_low_noise", "evaluated_checkpoints"):
            _materialize(instance, key)
        result = tick(day + datetime.timedelta(hours=14, minutes=35), result)
        assert result.get_num_requested(AssetKey("lora_high_noise")) == 0
        result = tick(day + datetime.timedelta(days=1, hours=14, minutes=5), result)  # next night
        assert result.get_num_requested(AssetKey("lora_high_noise")) == 0, "unchanged cache: no retraining"
        _materialize(instance, "latent_cache")
        result = tick(day + datetime.timedelta(days=1, hours=15), result)
        assert result.get_num_requested(AssetKey("lora_high_noise")) == 0, "new data waits for the next tick"
        result = tick(day + datetime.timedelta(days=2, hours=14, minutes=5), result)
        assert result.get_num_requested(AssetKey("lora_high_noise")) == 1


def test_deployment_settings_become_resource_fields_and_crons() -> None:
    from wan_assets.automation import evaluation_schedule, retrain_condition
    from wan_assets.definitions import Settings, resources, settings

    env = {
        "WAN_ASSETS_CONFIG": "/deploy/job.yaml",
        "WAN_ASSETS_HOME": "/deploy/work",
        "WAN_ASSETS_TRAIN_PROCS": "4",
        "WAN_ASSETS_RETRAIN_CRON": "0 3 * * *",
        "WAN_ASSETS_EVAL_CRON": "0 7 * * *",
    }
    deployment = settings(env)
    built = resources(deployment)
    assert (built["project"].config_path, built["project"].workdir) == ("/deploy/job.yaml", "/deploy/work")
    assert built["launcher"].nproc_per_node == 4
    assert evaluation_schedule(deployment.eval_cron).cron_schedule == "0 7 * * *"
    assert "0 3 * * *" in str(retrain_condition(deployment.retrain_cron))
    assert settings({}) == Settings() and Settings().retrain_cron == "0 2 * * *"
