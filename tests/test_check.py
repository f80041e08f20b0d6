"""`wan-assets check` and the preflight of cache/train: every refusal up front, all at once."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from wan_assets.cli import main
from wan_assets.core.config import parse_config
from wan_assets.core.train.preflight import preflight

from .conftest import CONFIGS, tiny_job_raw

CPU = torch.device("cpu")
MODEL_PARTS = ["transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"]


def fake_model(root: Path, parts: list[str] = MODEL_PARTS) -> Path:
    """A folder in the diffusers layout with nothing inside: enough for the layout checks."""
    for part in parts:
        (root / part).mkdir(parents=True)
    index = {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def ready(tmp_path: Path) -> dict:
    """The tiny config over a fake model and one (fake) clip: preflight finds nothing wrong."""
    clips = tmp_path / "data"
    clips.mkdir()
    (clips / "a.mp4").write_bytes(b"0")
    return tiny_job_raw(clips, fake_model(tmp_path / "model"))


def _process(raw: dict) -> dict:
    return raw["config"]["process"][0]


def _problems(raw: dict, workdir: Path, device: torch.device = CPU) -> list[str]:
    return preflight(parse_config(raw, workdir=workdir).job, device=device)


def _check(raw: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    code = main(["check", str(config), "--workdir", str(tmp_path / "work")])
    return code, capsys.readouterr().err


def test_a_ready_config_has_no_problems(ready, tmp_path) -> None:
    assert _problems(ready, tmp_path) == []


def test_check_lists_every_problem_and_exits_1(ready, tmp_path, capsys) -> None:
    process = _process(ready)
    process["model"]["name_or_path"] = str(tmp_path / "no_model")
    process["sample"]["samples"] = [{"prompt": "a", "ctrl_img": "first.png"}]
    process["train"]["attention_backend"] = "nonsense"
    code, err = _check(ready, tmp_path, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[0] == f"error: {tmp_path / 'job.yaml'}: 3 problems:"
    assert lines[1].startswith(f"  model.name_or_path: model folder {tmp_path / 'no_model'} does not exist")
    assert lines[2].startswith("  train.attention_backend: unknown attention backend 'nonsense'")
    first = (tmp_path / "work" / "first.png").resolve()
    assert (
        lines[3]
        == f"  sample.samples[0].ctrl_img: {first} does not exist; point it at the first frame to sample from"
    )


def test_model_folder_without_the_diffusers_layout(ready, tmp_path) -> None:
    _process(ready)["model"]["name_or_path"] = str(fake_model(tmp_path / "half", ["transformer", "vae"]))
    (problem,) = _problems(ready, tmp_path)
    missing = "scheduler/, transformer_2/, tokenizer/, text_encoder/"
    assert problem.startswith(f"model.name_or_path: model folder {tmp_path / 'half'} lacks {missing}; ")


def test_workdir_tiny_model_is_accepted_before_it_is_built(ready, tmp_path, capsys) -> None:
    _process(ready)["model"]["name_or_path"] = "./models/wan22-i2v-tiny"
    code, err = _check(ready, tmp_path, capsys)
    assert code == 0, err
    assert not (tmp_path / "work" / "models").exists()  # check builds nothing


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_attention_without_flash_attn(ready, tmp_path) -> None:
    _process(ready)["train"]["attention_backend"] = "flash"
    (problem,) = _problems(ready, tmp_path)
    assert problem.startswith("train.attention_backend: attention backend 'flash' needs the 'flash_attn'")


@pytest.mark.parametrize("qtype", ["uint4", "int4|ostris/some_adapter.safetensors"])
def test_uint4_trains_anywhere_and_an_adapter_is_named(ready, tmp_path, qtype) -> None:
    _process(ready)["model"].update(quantize=True, qtype=qtype)
    loaded = parse_config(ready, workdir=tmp_path)
    assert preflight(loaded.job, device=CPU) == []
    adapter = [w for w in loaded.warnings if "accuracy recovery adapter" in w]
    if "|" in qtype:
        (line,) = adapter
        assert "'ostris/some_adapter.safetensors' is not applied here" in line and "plain uint4" in line
    else:
        assert adapter == []


@pytest.mark.parametrize("qtype", ["qfloat8", "qint8"])
def test_weight_only_fp8_and_int8_run_on_cpu(ready, tmp_path, qtype) -> None:
    _process(ready)["model"].update(quantize=True, qtype=qtype)
    assert _problems(ready, tmp_path) == []


def test_unknown_qtype(ready, tmp_path) -> None:
    _process(ready)["model"].update(quantize=True, qtype="nf4")
    (problem,) = _problems(ready, tmp_path)
    assert problem.startswith("model.qtype 'nf4' is not supported")


def test_fp8_compute_needs_an_fp8_gpu_and_each_option_gets_its_line(ready, tmp_path) -> None:
    _process(ready)["model"].update(quantize=True, qtype="uint4")
    _process(ready)["train"].update(fp8_compute=True, activation_offload=True, gradient_checkpointing=False)
    problems = _problems(ready, tmp_path)
    assert len(problems) == 2, problems
    assert problems[0].startswith("train.fp8_compute needs an fp8-capable GPU (sm_89+); this is cpu")
    assert problems[1].startswith("train.activation_offload")


def test_fp16_on_cpu(ready, tmp_path) -> None:
    _process(ready)["train"]["dtype"] = "fp16"
    assert _problems(ready, tmp_path) == ["train.dtype fp16 needs a GPU; use bf16 or fp32 on CPU"]


def test_automagic_bounds_are_checked_before_training(ready, tmp_path) -> None:
    _process(ready)["train"].update(optimizer="automagic", lr=0.5)
    (problem,) = _problems(ready, tmp_path)
    assert "automagic start lr 0.5 for high_noise is outside [min_lr, max_lr]" in problem


def test_ctrl_img_that_is_not_an_image(ready, tmp_path) -> None:
    (tmp_path / "frame.png").write_text("not a png")
    (tmp_path / "good.png").write_bytes(_png())
    _process(ready)["sample"]["samples"] = [
        {"prompt": "a", "ctrl_img": "good.png"},
        {"prompt": "b", "ctrl_img": str(tmp_path / "frame.png")},
    ]
    (problem,) = _problems(ready, tmp_path)
    assert problem.startswith(f"sample.samples[1].ctrl_img: {tmp_path / 'frame.png'} is not an image")


def test_empty_dataset_folder_is_an_error_and_stays_empty(ready, tmp_path, capsys) -> None:
    empty = tmp_path / "work" / "clips"
    empty.mkdir(parents=True)
    _process(ready)["datasets"][0]["folder_path"] = "clips"  # the folder the demo's clips go to
    code, err = _check(ready, tmp_path, capsys)
    assert code == 1
    assert f"datasets[0].folder_path: {empty} has no video clips (.avi .m4v .mkv .mov .mp4 .webm)" in err
    assert list(empty.iterdir()) == []  # no synthetic shapes in a user's folder


def test_cache_refuses_before_any_work(ready, tmp_path, capsys) -> None:
    _process(ready)["sample"]["samples"] = [{"prompt": "a", "ctrl_img": "missing.png"}]
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(ready, sort_keys=False))
    for command in ("cache", "train"):
        assert main([command, str(config), "--workdir", str(tmp_path / "work")]) == 1
        err = capsys.readouterr().err
        assert "sample.samples[0].ctrl_img:" in err and "missing.png does not exist" in err
    assert not (tmp_path / "work" / "cache").exists()


def test_the_embedded_default_passes_check_in_a_fresh_workdir(tmp_path, capsys) -> None:
    work = tmp_path / "work"
    assert main(["check", str(CONFIGS / "tiny_cpu.yaml"), "--workdir", str(work)]) == 0
    assert "ok:" in capsys.readouterr().err
    assert any(p.suffix == ".mp4" for p in (work / "clips").iterdir())  # its synthetic dataset


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="PNG")
    return out.getvalue()
