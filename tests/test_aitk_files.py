"""ai-toolkit job files as their users have them pass `check` and train, changed only in their paths.

tests/data holds them, rebuilt from the upstream sources (tests/data/README.md says how): the web
UI's generated Wan 2.2 I2V job, both forks' Wan 2.2 example with `arch: wan22_14b_i2v`, and the
seed fork's `i2v_lora_alpha_scheduling.yaml`. Their model, dataset, output and control-image paths
are `${VAR}` placeholders, set here to the tiny model and two synthetic clips. Each trains two
steps (the only overrides: TrainOptions' stop_after, and samples off, as the UI file samples ten
prompts at 1024x1024 before its first step, which the tiny model on CPU would take minutes for; the
seed file's flash attention where flash-attn is not installed).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from wan_assets.core.config import load_config
from wan_assets.core.data.cache import EncoderHandle, cache_dataset
from wan_assets.core.train.loop import train
from wan_assets.core.train.metrics_log import read_lines
from wan_assets.core.train.preflight import preflight

DATA = Path(__file__).parent / "data"
UI_JOB = "aitk_ui_wan22_14b_i2v.job_config.json"
OSTRIS = "ostris_train_lora_wan22_14b_24gb.yaml"
RELAXIS = "relaxis_train_lora_wan22_14b_24gb.yaml"
SEED = "relaxis_i2v_lora_alpha_scheduling.yaml"
# Long enough for the seed's 33 frames; one landscape clip, one portrait.
CLIPS = ("more/square_circle", "triangle_spins")


@pytest.fixture
def user_paths(
    tmp_path: Path, clips_dir: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The placeholders of the files, pointed at this machine (the workdir is returned)."""
    dataset = tmp_path / "my_clips"
    dataset.mkdir()
    for name in CLIPS:
        for ext in (".mp4", ".txt"):
            shutil.copy(clips_dir / f"{name}{ext}", dataset / f"{Path(name).name}{ext}")
    Image.new("RGB", (96, 64), (200, 40, 40)).save(tmp_path / "first_frame.png")
    monkeypatch.setenv("WAN22_I2V_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("DATASET_FOLDER", str(dataset))
    monkeypatch.setenv("TRAINING_FOLDER", str(tmp_path / "output"))
    monkeypatch.setenv("CTRL_IMG", str(tmp_path / "first_frame.png"))
    return tmp_path


@pytest.mark.parametrize("name", [UI_JOB, OSTRIS, RELAXIS, SEED])
def test_job_file_checks_and_trains_unchanged(name: str, user_paths: Path) -> None:
    loaded = load_config(DATA / name, workdir=user_paths)
    job = loaded.job
    problems = preflight(job, device=torch.device("cpu"))
    if job.process.train.attention_backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        # The seed file asks for flash-attn, a GPU package this CPU machine lacks: the one problem
        # of this machine, not of the file. It trains here with PyTorch's own attention instead.
        assert [p.split(":")[0] for p in problems] == ["train.attention_backend"]
        train_cfg = job.process.train.model_copy(update={"attention_backend": "sdpa"})
        job = job.model_copy(update={"process": job.process.model_copy(update={"train": train_cfg})})
    else:
        assert problems == []
    assert loaded.warnings[0].startswith("keys known from ai-toolkit that have no effect here: ")
    cache = user_paths / "cache"
    report = cache_dataset(job, cache, EncoderHandle(str(job.process.model.name_or_path)))
    assert not report.failures, report.failures
    result = train(job, cache, stop_after=2, samples=False)
    lines = read_lines(result.files.metrics)
    assert [line["step"] for line in lines] == [0, 1]
    assert all(line["loss"] is not None and line["skipped"] is None for line in lines)


def test_what_the_ui_job_asks_for_is_what_is_built(user_paths: Path) -> None:
    loaded = load_config(DATA / UI_JOB, workdir=user_paths)
    process = loaded.job.process
    inert = loaded.warnings[0]
    for key in (
        "sqlite_db_path",
        "logging.use_ui_logger",
        "datasets[0].mask_path",
        "datasets[0].controls",
        "train.diff_output_preservation",
        "model.layer_offloading",
    ):
        assert key in inert
    # Implemented, not inert: repeats, EMA (off), schedule, baseline sample, compile, uint4 none here.
    for key in ("num_repeats", "ema_config", "sample_start_step", "skip_first_sample", "model.compile"):
        assert key not in inert
    assert process.datasets[0].num_repeats == 1 and process.datasets[0].resolution == [512, 768, 1024]
    assert process.train.lr_scheduler == "constant" and process.train.ema_config.use_ema is False
    assert process.train.compile is False and process.model.quantize and process.model.qtype == "qfloat8"
    sample = process.sample
    assert sample is not None and len(sample.all_prompts()) == 10
    assert process.train.samples_first(resumed=False)  # skip_first_sample: false
    assert [s for s in range(0, 751) if sample.should_sample(s, final=False)] == [250, 500, 750]
    assert sample.prompt_seed(3, sample.all_prompts()[3]) == 45  # walk_seed: true


def test_the_seed_file_names_its_adapter_and_trains_its_ema(user_paths: Path) -> None:
    loaded = load_config(DATA / SEED, workdir=user_paths)
    job = loaded.job
    assert job.process.model.qtype == "uint4"
    assert job.process.model.accuracy_recovery_adapter == (
        "ostris/accuracy_recovery_adapters/wan22_14b_i2v_torchao_uint4.safetensors"
    )
    (adapter,) = [w for w in loaded.warnings if "accuracy recovery adapter" in w]
    assert "is not applied here" in adapter
    assert job.process.train.ema_config.use_ema and job.process.train.ema_config.ema_decay == 0.99


def test_every_key_ai_toolkit_reads_for_wan_is_implemented_aliased_or_in_the_table() -> None:
    """tests/data/aitk_keys_read_for_wan.txt: ai-toolkit's config_modules.py keys by section."""
    from wan_assets.core import aitk_keys
    from wan_assets.core.config import field_sections

    fields = {f"{s}.{k}" if s else k for s, keys in field_sections().items() for k in keys}
    fields |= {"train.gradient_accumulation"}  # the field whose ai-toolkit alias is listed
    known = fields | {a.path for a in aitk_keys.ALIASES} | set(aitk_keys.BY_PATH)
    lines = (DATA / "aitk_keys_read_for_wan.txt").read_text().splitlines()
    keys = [line for line in lines if line and not line.startswith("#")]
    assert len(keys) > 300
    assert [k for k in keys if k not in known] == []
    # A key is one thing: a field is never also a row of the table or an alias.
    assert not fields & set(aitk_keys.BY_PATH)
    assert not fields & {a.path for a in aitk_keys.ALIASES}


def test_readme_says_what_each_ai_toolkit_key_does() -> None:
    from wan_assets.core.config import key_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- aitk-keys:start -->\n", "<!-- aitk-keys:end -->"
    section = readme[readme.index(start) + len(start) : readme.index(end)]
    assert section == key_reference(), (
        "README.md is out of date: paste config.key_reference() between the marks"
    )
