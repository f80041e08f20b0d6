"""The command line: user mistakes are one line (never a traceback), synthetic clips only for the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from resources.project import WanProjectResource
from wan_assets.cli import main
from wan_assets.core.workdir import TINY_CONFIG

from .conftest import REPO


def _empty_database(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    duckdb.connect(str(workdir / "metrics.duckdb")).close()


def test_sql_into_a_pipe_that_closes_early_ends_quietly(tmp_path: Path) -> None:
    _empty_database(tmp_path)
    command = [sys.executable, "-m", "wan_assets.cli", "sql", "SELECT * FROM range(100000)"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*command, "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout.readline().strip() == b"range"  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141, err  # 128 + SIGPIPE, as `cat` ends
    assert err == "", err


def test_bad_sql_is_one_line(tmp_path: Path, capsys) -> None:
    _empty_database(tmp_path)
    assert main(["sql", "SELEC 1", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: query failed: Parser Error: syntax error") and err.count("\n") == 1


def test_missing_config_is_one_line(tmp_path: Path, capsys) -> None:
    for command in ("check", "cache", "train", "eval"):
        assert main([command, str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)]) == 1
        assert capsys.readouterr().err == f"error: {tmp_path / 'nope.yaml'}: config file not found\n"


def test_workdir_that_is_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "work").write_text("")
    assert main(["sql", "SELECT 1", "--workdir", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: workdir {tmp_path / 'work'} is a file, not a folder; pass --workdir DIR\n"


def _user_config(tmp_path: Path) -> Path:
    """The default config's content under another name: a user's file, not the embedded default."""
    config = tmp_path / "mine.yaml"
    config.write_text(TINY_CONFIG.read_text())
    return config


def test_cli_writes_no_synthetic_clips_for_a_user_config(tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    (work / "clips").mkdir(parents=True)
    assert main(["cache", str(_user_config(tmp_path)), "--workdir", str(work)]) == 1
    assert "datasets[0].folder_path: " in capsys.readouterr().err
    assert list((work / "clips").iterdir()) == []


def test_resource_writes_synthetic_clips_only_for_the_default_config(tmp_path: Path) -> None:
    mine = WanProjectResource(config_path=str(_user_config(tmp_path)), workdir=str(tmp_path / "a"))
    mine.root()
    assert not (tmp_path / "a" / "clips").exists()
    default = WanProjectResource(config_path=str(TINY_CONFIG), workdir=str(tmp_path / "b"))
    default.root()
    assert any(p.suffix == ".mp4" for p in (tmp_path / "b" / "clips").iterdir())


def test_bad_yaml_is_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("job: extension\nconfig: [unclosed\n")
    assert main(["check", str(config), "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {config}: not valid YAML: line 3, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)\n"
    )


@pytest.mark.parametrize("raw", [["a", "list"], {"job": "extension", "config": {"name": "x"}}])
def test_config_of_the_wrong_shape_is_one_line(tmp_path: Path, capsys, raw) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["check", str(config), "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_sql_works_right_after_a_cli_training(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path, capsys
) -> None:
    from .conftest import tiny_job_raw

    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "cache").symlink_to(tiny_cache / "cache")  # the cached latents, without the database
    raw = tiny_job_raw(clips_dir, tiny_model_dir, steps=4)
    raw["config"]["process"][0].update(training_folder=str(tmp_path / "runs"), sample=None)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["train", str(config), "--workdir", str(workdir)]) == 0
    assert "metrics: 4 steps of run" in capsys.readouterr().out
    assert (
        main(
            [
                "sql",
                "SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM metrics",
                "--workdir",
                str(workdir),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.split()
    assert table[-2:] == ["4", "1"], table
    # Loading again (a re-run of the asset, or `train --resume` at the end) adds no duplicates.
    assert main(["train", str(config), "--workdir", str(workdir), "--resume"]) == 0
    capsys.readouterr()
    assert main(["sql", "SELECT count(*) FROM metrics", "--workdir", str(workdir)]) == 0
    assert capsys.readouterr().out.split()[-1] == "4"


# `wan-assets train` in a fresh interpreter, its real imports included, with the job's loading
# replaced by a stand-in that prints the folders torch.compile and the memory plan use.
PRINT_CACHE_DIRS = """
import sys

import wan_assets.cli as cli


def fake_load(args, *rest, **kwargs):
    from torch._dynamo.package import DynamoCache
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from wan_assets.core.speed.options import _plan_path

    print("dirs", cache_dir(), DynamoCache.path_prefix(), _plan_path())
    raise SystemExit(0)


cli._load = fake_load
sys.exit(cli.main(sys.argv[1:]))
"""


def test_train_keeps_torch_compile_caches_in_the_workdir(
    tmp_path: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    """A new `wan-assets train` process puts torch.compile's caches (inductor's, dynamo's) and the
    memory plan in <workdir>/compile_cache: set before the job loads, since importing torch._dynamo
    (loading the model does) fixes the folder, at /tmp's default when unset. Torch's default, as a
    parent process that imported torch._dynamo hands it down (Dagster's does), is replaced; a
    user's own TORCHINDUCTOR_CACHE_DIR wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from .conftest import tiny_job_raw

    raw = tiny_job_raw(clips_dir, tiny_model_dir, steps=4)
    raw["config"]["process"][0].update(training_folder=str(tmp_path / "runs"), sample=None)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    workdir = tmp_path / "work"

    def dirs(**env: str) -> list[str]:
        base = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
        out = subprocess.run(
            [sys.executable, "-c", PRINT_CACHE_DIRS, "train", str(config), "--workdir", str(workdir)],
            capture_output=True, text=True, cwd=REPO, env={**base, **env}, timeout=300,
        )  # fmt: skip
        line = next((x for x in out.stdout.splitlines() if x.startswith("dirs ")), None)
        assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
        return line.split()[1:]

    cache = workdir / "compile_cache"
    assert dirs() == [str(cache), str(cache / "dynamo"), str(cache / "wan_assets_memory_plan.json")]
    assert dirs(TORCHINDUCTOR_CACHE_DIR=default_cache_dir())[0] == str(cache)
    assert dirs(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine"))[0] == str(tmp_path / "mine")
