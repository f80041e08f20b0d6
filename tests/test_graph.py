"""The whole asset graph through `wan-assets demo` on the tiny model: real Pipes, real `wan-assets train`, DuckDB."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    EventRecordsFilter,
    materialize,
)
from PIL import Image

from resources.project import WanProjectResource
from wan_assets.assets.training import evaluated_checkpoints
from wan_assets.core.data.synthetic import write_bad_inputs
from wan_assets.core.metrics.report import query
from wan_assets.core.workdir import Workdir
from wan_assets.definitions import resources

from .conftest import CONFIGS, REPO


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory, clips_dir: Path, tiny_model_dir: Path):
    """`wan-assets demo` (what `make demo` runs), with one corrupt clip among the sample clips; its
    instance, project and console output are shared by the tests of this module."""
    workdir = tmp_path_factory.mktemp("graph")
    shutil.copytree(clips_dir, workdir / "clips")
    shutil.copytree(tiny_model_dir, workdir / "models" / "wan22-i2v-tiny")
    bad = write_bad_inputs(tmp_path_factory.mktemp("bad"))["corrupt"]
    shutil.copy(bad, workdir / "clips" / "broken.mp4")
    shutil.copy(bad.with_suffix(".txt"), workdir / "clips" / "broken.txt")
    env = {**os.environ, "DAGSTER_HOME": "", "WAN_ASSETS_HOME": ""}
    demo = subprocess.run(
        [sys.executable, "-m", "wan_assets.cli", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    project = WanProjectResource(config_path=str(CONFIGS / "tiny_cpu.yaml"), workdir=str(workdir))
    all_resources = {**resources(), "project": project}
    with DagsterInstance.from_config(str(Workdir.open(workdir).dagster_home)) as instance:
        yield instance, project, all_resources, demo


def test_demo_prints_progress_names_the_bad_clip_and_fails(graph) -> None:
    *_, demo = graph
    out = demo.stdout
    assert demo.returncode == 1, out + demo.stderr  # a clip failed: the demo says so in its exit status
    assert re.search(r"batch 1/1: 10 of 11 clips cached, 1 failed", out), out
    # Named with its reason, in the summary, while everything after the clips still ran.
    assert re.search(r"error: clip \S*broken\.mp4 failed: .*broken\.mp4", demo.stderr), demo.stderr
    assert "step 300/300" in out and "phase transitions:" in out and "best_val_loss" in out
    # Progress and the summary, not Dagster's event stream, log lines or warnings.
    both = out + demo.stderr
    for noise in (" - dagster - ", "DEBUG", "BetaWarning", "PreviewWarning", "[pipes]", "STEP_START"):
        assert noise not in both, f"{noise!r} in the demo's output:\n{both}"


def _materialization(instance: DagsterInstance, key: str):
    return instance.get_latest_materialization_event(AssetKey(key)).asset_materialization


def test_training_reports_transitions_plot_and_live_observations(graph) -> None:
    instance, _, _, _ = graph
    for expert in ("high_noise", "low_noise"):
        meta = _materialization(instance, f"lora_{expert}").metadata
        assert meta["steps"].value == 300
        rows = meta["phase_transitions"].value.records
        # This expert's transitions, in three narrow columns: phase and alpha change, criteria summarised.
        assert len(rows) == 1 and set(rows[0].data) == {"step", "phase", "criteria"}
        assert "-> emphasis (alpha" in rows[0].data["phase"] and " passed" in rows[0].data["criteria"]
        with Image.open(meta["loss_plot"].value) as plot:
            assert plot.format == "PNG" and plot.size[0] > 300
        assert meta["loss_plot_preview"].value.startswith("![loss per expert](data:image/png;base64,")
        assert Path(meta["lora"].value).is_file()
    # Observations came from the running trainer, each before the materialization that ended it.
    observations = instance.fetch_observations(AssetKey("lora_high_noise"), limit=100).records
    materialized_at = instance.get_latest_materialization_event(AssetKey("lora_high_noise")).timestamp
    progress = [o for o in observations if o.asset_observation.metadata["kind"].value == "progress"]
    transitions = [o for o in observations if o.asset_observation.metadata["kind"].value == "transition"]
    assert len(progress) >= 10 and len(transitions) == 1
    assert all(o.timestamp < materialized_at for o in observations)
    assert {"loss_ema_50", "gradient_stability_avg", "phase", "conv_alpha", "eta_s"} <= set(
        progress[-1].asset_observation.metadata
    )
    # Told apart at a glance: the event list shows each observation's description.
    assert transitions[0].asset_observation.description.startswith("phase transition at step")
    assert progress[-1].asset_observation.description.startswith("progress: step")
    loss = progress[-1].asset_observation.metadata["loss"].value
    assert loss == float(f"{loss:.4g}")  # rounded to 4 significant digits
    checks = instance.event_log_storage.get_event_records(
        EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION), limit=20
    )
    names = {r.event_log_entry.dagster_event.event_specific_data.check_name for r in checks}
    assert {"training_loss_finite", "beats_base_model"} <= names


def test_evaluation_is_deterministic_and_has_a_contact_sheet(graph) -> None:
    instance, _, all_resources, _ = graph
    first = _materialization(instance, "evaluated_checkpoints").metadata
    with Image.open(first["contact_sheet"].value) as sheet:
        assert sheet.format == "PNG"
    assert first["best_step"].value == 300 and first["best_val_loss"].value < first["base_val_loss"].value
    again = materialize([evaluated_checkpoints], resources=all_resources, instance=instance)
    second = again.asset_materializations_for_node("evaluated_checkpoints")[0].metadata
    assert [r.data for r in second["checkpoints"].value.records] == [
        r.data for r in first["checkpoints"].value.records
    ]


def test_training_metrics_idempotent_and_readme_sql_runs(graph) -> None:
    instance, project, all_resources, _ = graph
    database = project.root().database
    tables = ("runs", "metrics", "phase_transitions", "checkpoints", "evaluations")
    before = {t: query(database, f"SELECT count(*) FROM {t}")[1][0][0] for t in tables}
    assert before["metrics"] == 300 and before["phase_transitions"] == 2 and before["evaluations"] > 0
    from wan_assets.assets.metrics import training_metrics

    assert materialize([training_metrics], resources=all_resources, instance=instance).success
    after = {t: query(database, f"SELECT count(*) FROM {t}")[1][0][0] for t in tables}
    assert after == before
    # Every SQL example in the README runs against the demo's database, through the CLI.
    readme = (REPO / "README.md").read_text()
    examples = [s for s in re.findall(r'wan-assets sql "(.+?)"', readme) if "..." not in s]
    assert len(examples) >= 4
    for sql in examples:
        out = subprocess.run(
            [sys.executable, "-m", "wan_assets.cli", "sql", sql, "--workdir", str(project.root().root)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, f"{sql}\n{out.stderr}"
