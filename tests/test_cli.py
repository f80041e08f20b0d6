"""The command line: user mistakes are one line (never a traceback), synthetic clips only for the demo."""

from __future__ import annotations

from pathlib import Path

import duckdb

from resources.project import WanProjectResource
from wan_assets.cli import main
from wan_assets.core.workdir import TINY_CONFIG


def _empty_database(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    duckdb.connect(str(workdir / "metrics.duckdb")).close()


def test_bad_sql_is_one_line(tmp_path: Path, capsys) -> None:
    _empty_database(tmp_path)
    assert main(["sql", "SELEC 1", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: query failed: Parser Error: syntax error") and err.count("\n") == 1


def test_missing_config_is_one_line(tmp_path: Path, capsys) -> None:
    for command in ("check", "cache", "train", "eval"):
        assert main([command, str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)]) == 1
        assert capsys.readouterr().err == f"error: {tmp_path / 'nope.yaml'}: config file not found\n"


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
