"""End to end through the real web server: a clip dropped into the dataset folder is picked up by
the sensor (running in the daemon that `wan-assets ui` starts), materialized, and its metadata is
read back over GraphQL."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import CONFIGS
from .test_ui import BEARER, TOKEN, _free_port, _stop, start_server

MATERIALIZED_TIMEOUT_S = 360.0

LATENTS_QUERY = """
{ assetOrError(assetKey: {path: ["latents"]}) {
    ... on Asset { assetMaterializations(partitions: ["dropped_in.mp4"], limit: 1) {
        partition runId
        metadataEntries { label ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } }
    } } } }
"""


def test_dropped_clip_is_materialized_by_the_sensor(
    tmp_path: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    workdir = tmp_path / "work"
    shutil.copytree(tiny_model_dir, workdir / "models" / "wan22-i2v-tiny")
    raw = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    raw["config"]["process"][0]["datasets"][0]["folder_path"] = str(incoming)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    port = _free_port()
    env = {
        **os.environ,
        "WAN_ASSETS_AUTH": TOKEN,
        "WAN_ASSETS_HOME": str(workdir),
        "DAGSTER_HOME": str(workdir / "dagster"),
    }
    log = tmp_path / "ui.log"
    env.pop("WAN_ASSETS_CONFIG", None)  # the job file is the argument, as for every other command
    command = [
        sys.executable,
        "-m",
        "wan_assets.cli",
        "ui",
        str(config),
        "--port",
        str(port),
        "--workdir",
        str(workdir),
    ]
    server = start_server(command, env, port, log)
    process = server.process
    try:
        # Drop a clip (caption first: the sensor must see a complete pair).
        shutil.copy(clips_dir / "circle_right.txt", incoming / "dropped_in.txt")
        shutil.copy(clips_dir / "circle_right.mp4", incoming / "dropped_in.mp4")
        deadline = time.monotonic() + MATERIALIZED_TIMEOUT_S
        materializations = []
        while time.monotonic() < deadline and not materializations:
            status, body = server.graphql(LATENTS_QUERY, BEARER)
            assert status == 200, body
            materializations = json.loads(body)["data"]["assetOrError"]["assetMaterializations"]
            if not materializations:
                time.sleep(3)
        if not materializations:
            pytest.fail(
                f"no latents materialization within {MATERIALIZED_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
            )
        entries = {e["label"]: e for e in materializations[0]["metadataEntries"]}
        assert materializations[0]["partition"] == "dropped_in.mp4"
        assert entries["bucket"]["text"].endswith("x9")
        # Two cached jitter variants, each encoded as a clip and as its first-frame condition.
        assert entries["vae_calls"]["intValue"] == 4
        status, _ = server.graphql(LATENTS_QUERY, {"Authorization": "Bearer " + "y" * len(TOKEN)})
        assert status == 401
    finally:
        if process.poll() is None:
            assert _stop(process) == 0
