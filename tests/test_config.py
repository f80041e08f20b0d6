"""The ai-toolkit job format: the seed's example loads, mistakes get one clear message."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from PIL import Image

from wan_assets.cli import main
from wan_assets.core.config import ConfigError, load_config, parse_config

from .conftest import CONFIGS

SEED = CONFIGS / "i2v_lora_alpha_scheduling.yaml"


@pytest.fixture
def seed_raw() -> dict:
    return yaml.safe_load(SEED.read_text())


def _process(raw: dict) -> dict:
    return raw["config"]["process"][0]


def test_seed_example_loads_with_inert_keys_in_one_warning(workdir: Path) -> None:
    loaded = load_config(SEED, workdir=workdir)
    job = loaded.job
    assert job.name == "video_lora_training"
    assert job.experts == ("high_noise", "low_noise")
    net = job.process.network
    assert (net.linear, net.linear_alpha) == (64, 16)
    phases = net.alpha_schedule.phases_for("low_noise")
    assert [(name, p.alpha, p.min_steps) for name, p in phases] == [
        ("foundation", 8, 2000),
        ("balance", 14, 3000),
        ("emphasis", 20, 2000),
    ]
    assert phases[0][1].exit_criteria.loss_improvement_rate_below == 0.005
    assert job.process.train.optimizer == "automagic"
    assert job.process.train.optimizer_params.lr_bump == 5e-6
    assert job.process.train.switch_boundary_every == 100
    assert job.process.datasets[0].folder_path == (workdir / "clips").resolve()
    # One warning lists the inert keys; the other names the uint4 accuracy recovery adapter.
    assert len(loaded.warnings) == 2 and "accuracy recovery adapter" in loaded.warnings[1]
    for key in (
        "network.conv",
        "model.quantize_te",
        "model.qtype_te",
        "train.cache_text_embeddings",
        "sample.sampler",
    ):
        assert key in loaded.warnings[0]
    # Implemented here, so not among the inert keys: EMA (off in this file) and the seed walk.
    assert job.process.train.ema_config.use_ema is False
    assert "ema_config" not in loaded.warnings[0] and "walk_seed" not in loaded.warnings[0]


def test_all_shipped_configs_load(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAN22_I2V_PATH", "/models/wan22")
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert load_config(path, workdir=workdir).job.name


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("network", "lineer", "network.lineer: unknown key; did you mean linear?"),
        (
            "train",
            "gradient_checkpoint",
            "train.gradient_checkpoint: unknown key; did you mean gradient_checkpointing?",
        ),
        ("datasets", "caption_extt", "datasets[0].caption_extt: unknown key; did you mean caption_ext?"),
    ],
)
def test_typo_names_key_path_and_closest_key(seed_raw, workdir, section, key, expected) -> None:
    target = _process(seed_raw)[section]
    (target[0] if isinstance(target, list) else target)[key] = 1
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, workdir=workdir)
    assert str(err.value) == expected


def test_typo_inside_a_named_phase(seed_raw, workdir) -> None:
    phases = _process(seed_raw)["network"]["alpha_schedule"]["conv_alpha_phases"]
    phases["balance"]["exit_criteria"]["min_loss_r3"] = 0.1
    with pytest.raises(
        ConfigError, match=r"balance\.exit_criteria\.min_loss_r3: unknown key; did you mean min_loss_r2\?"
    ):
        parse_config(seed_raw, workdir=workdir)


def test_env_and_name_substitution(seed_raw, workdir, monkeypatch) -> None:
    monkeypatch.setenv("MY_TRIGGER", "zq7")
    _process(seed_raw)["trigger_word"] = "${MY_TRIGGER}"
    _process(seed_raw)["training_folder"] = "runs/[name]"
    job = parse_config(seed_raw, workdir=workdir).job
    assert job.process.trigger_word == "zq7"
    assert job.process.training_folder == (workdir / "runs" / "video_lora_training").resolve()


def test_missing_env_var_is_a_clear_error(seed_raw, workdir, monkeypatch) -> None:
    monkeypatch.delenv("WAN_NOT_SET_ANYWHERE", raising=False)
    _process(seed_raw)["model"]["name_or_path"] = "${WAN_NOT_SET_ANYWHERE}/wan"
    with pytest.raises(ConfigError, match="environment variable WAN_NOT_SET_ANYWHERE is not set"):
        parse_config(seed_raw, workdir=workdir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["datasets"][0].update(num_frames=32), r"num_frames must be 4k\+1.*use 29 or 33"),
        (
            lambda p: p["model"]["model_kwargs"].update(train_high_noise=False, train_low_noise=False),
            "trains no expert",
        ),
        (lambda p: p["network"].update(linear=0), r"network\.linear: .*rank\) must be > 0"),
        (
            lambda p: p["datasets"][0].update(folder_path="/no/such/folder"),
            "folder /no/such/folder does not exist",
        ),
        (lambda p: p["train"].update(optimizer="sgd"), r"train\.optimizer: Input should be"),
    ],
)
def test_cross_field_rules(seed_raw, workdir, edit, message) -> None:
    raw = copy.deepcopy(seed_raw)
    edit(_process(raw))
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, workdir=workdir)


def test_single_expert_and_per_expert_phase_override(seed_raw, workdir) -> None:
    process = _process(seed_raw)
    process["model"]["model_kwargs"]["train_high_noise"] = False
    process["network"]["alpha_schedule"]["per_expert"] = {"low_noise": {"foundation": {"alpha": 4}}}
    job = parse_config(seed_raw, workdir=workdir).job
    assert job.experts == ("low_noise",)
    schedule = job.process.network.alpha_schedule
    assert schedule.phases_for("low_noise")[0][1].alpha == 4
    assert schedule.phases_for("high_noise")[0][1].alpha == 8
    assert schedule.phases_for("low_noise")[0][1].min_steps == 2000


def test_models_are_frozen(workdir) -> None:
    job = load_config(SEED, workdir=workdir).job
    with pytest.raises(Exception, match="frozen"):
        job.process.train.lr = 1.0


def test_check_command(seed_raw, tmp_path, workdir, capsys) -> None:
    # The seed file with what this machine lacks swapped for what it has (the seed as it is: below).
    from .test_check import fake_model

    process = _process(seed_raw)
    process["model"].update(name_or_path=str(fake_model(tmp_path / "model")), qtype="qfloat8")
    process["train"]["attention_backend"] = "sdpa"
    Image.new("RGB", (8, 8)).save(workdir / "first_frame.png")
    (workdir / "clips" / "a.mp4").write_bytes(b"0")
    config = tmp_path / "seed.yaml"
    config.write_text(yaml.safe_dump(seed_raw, sort_keys=False))
    assert main(["check", str(config), "--workdir", str(workdir)]) == 0
    out, err = capsys.readouterr()
    assert "video_lora_training" in out and "alpha_schedule" in out
    assert "no effect here" in err and "network.conv" in err


def test_check_command_refuses_the_seed_file_on_a_machine_without_its_gpu_stack(
    tmp_path, workdir, capsys
) -> None:
    # A local model path instead of the hub id keeps the test off the network.
    config = tmp_path / "seed.yaml"
    config.write_text(SEED.read_text().replace("ai-toolkit/Wan2.2-I2V-A14B-Diffusers-bf16", "./no/model"))
    assert main(["check", str(config), "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert f"error: {config}: " in err
    for key in ("model.name_or_path", "sample.samples[0].ctrl_img", "datasets[0].folder_path"):
        assert f"  {key}: " in err
    if importlib.util.find_spec("flash_attn") is None:
        assert "  train.attention_backend: " in err
    # uint4 trains here; its accuracy recovery adapter does not, and the warning says so.
    assert "accuracy recovery adapter 'ostris/accuracy_recovery_adapters/" in err


def test_check_command_fails_with_one_line(tmp_path, workdir, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SEED.read_text().replace("linear: 64", "lineer: 64"))
    assert main(["check", str(bad), "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: network.lineer: unknown key; did you mean linear?"


def test_full_disk_is_one_clear_message(workdir, capsys, monkeypatch) -> None:
    import errno

    import wan_assets.cli as cli

    def full(_args):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "cache" / "x.safetensors"))

    monkeypatch.setattr(cli, "cmd_check", full)  # _parser() binds the command when main() runs
    assert cli.main(["check", str(SEED), "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: disk full while writing ") and "x.safetensors" in err


def test_partial_per_expert_exit_criteria_inherit_the_shared_phase(seed_raw, workdir) -> None:
    from wan_assets.core.train.alpha_schedule import AlphaScheduler

    schedule = _process(seed_raw)["network"]["alpha_schedule"]
    shared = schedule["conv_alpha_phases"]["foundation"]["exit_criteria"]
    shared["max_loss_cv"] = 0.9
    schedule["per_expert"] = {"low_noise": {"foundation": {"exit_criteria": {"min_loss_r2": 0.7}}}}
    job = parse_config(seed_raw, workdir=workdir).job
    scheduler = AlphaScheduler(job.process.network, job.experts)
    assert scheduler.record(0, "low_noise", 0.5, 0.5) is None  # step 0 crashed with a dict here
    low = scheduler.machines["low_noise"].phase.exit_criteria
    assert low.min_loss_r2 == 0.7
    # The keys not written keep the shared phase's values, not ExitCriteria's defaults.
    assert low.loss_improvement_rate_below == shared["loss_improvement_rate_below"] == 0.005
    assert low.min_gradient_stability == shared["min_gradient_stability"]
    assert low.max_loss_cv == shared["max_loss_cv"]
    high = scheduler.machines["high_noise"].phase.exit_criteria
    assert high.min_loss_r2 == shared["min_loss_r2"]
    # The run's config.yaml (dump_config) loads back to the same phases.
    from wan_assets.core.config import dump_config

    again = parse_config(yaml.safe_load(dump_config(job)), workdir=workdir).job
    assert again.process.network.alpha_schedule.phases_for("low_noise") == (
        job.process.network.alpha_schedule.phases_for("low_noise")
    )


def test_every_mistake_of_the_file_at_once(seed_raw, workdir, monkeypatch) -> None:
    monkeypatch.delenv("WAN_NOT_SET_ANYWHERE", raising=False)
    seed_raw["config"]["nmae"] = "x"
    process = _process(seed_raw)
    process["network"]["lineer"] = 1
    process["train"]["gradient_checkpointing"] = "sometimes"
    process["datasets"][0]["num_frames"] = 32
    process["trigger_word"] = "${WAN_NOT_SET_ANYWHERE}"
    del process["model"]["name_or_path"]
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, source=Path("job.yaml"), workdir=workdir)
    assert err.value.problems == (
        "config.nmae: unknown key; did you mean name?",
        "trigger_word: environment variable WAN_NOT_SET_ANYWHERE is not set (used as ${WAN_NOT_SET_ANYWHERE})",
        "network.lineer: unknown key; did you mean linear?",
        "datasets[0].num_frames: num_frames must be 4k+1 (the Wan VAE compresses time 4x), got 32; "
        "use 29 or 33",
        # Both members of `bool | "selective"` fail: one line, not two.
        "train.gradient_checkpointing: Input should be a valid boolean, unable to interpret input; "
        "or Input should be 'selective'",
        "model.name_or_path: required key is missing",
    )
    assert str(err.value).splitlines()[0] == "job.yaml: 6 problems:"


def test_missing_folders_are_reported_together(seed_raw, workdir) -> None:
    process = _process(seed_raw)
    process["datasets"].append({"folder_path": "/no/such/folder"})
    process["validation"] = {"folder_path": "held_out"}
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, workdir=workdir)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "datasets[1].folder_path",
        "validation.folder_path",
    ]
    assert f"{workdir / 'held_out'} does not exist" in err.value.problems[1]


def test_relative_ctrl_img_resolves_against_the_workdir(seed_raw, workdir) -> None:
    job = parse_config(seed_raw, workdir=workdir).job
    assert job.process.sample.samples[0].ctrl_img == str((workdir / "first_frame.png").resolve())


# --- ai-toolkit keys: accepted when they ask for nothing, refused by name otherwise --------------------


def test_a_key_asking_for_what_is_not_built_names_key_value_and_fix(seed_raw, workdir) -> None:
    _process(seed_raw)["datasets"][0]["mask_path"] = "masks/"
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, workdir=workdir)
    assert err.value.problems == (
        "datasets[0].mask_path: 'masks/' asks for loss masks, which this project does not build; "
        "remove the key (or set it to null or '')",
    )


def test_one_report_holds_typos_refusals_value_errors_and_folders(seed_raw, workdir) -> None:
    process = _process(seed_raw)
    process["train"]["noise_ofset"] = 0.1  # typo
    process["train"]["loss_type"] = "mae"  # asks for a loss not built
    process["datasets"][0]["num_frames"] = 32  # bad value
    process["datasets"][0]["folder_path"] = "/no/such/clips"
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, workdir=workdir)
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("train.loss_type: 'mae' asks for a loss other than flow-matching MSE")
    assert any(p.startswith("train.noise_ofset: unknown key; did you mean noise_offset?") for p in problems)
    assert any(p.startswith("datasets[0].num_frames: num_frames must be 4k+1") for p in problems)
    assert problems[-1].startswith("datasets[0].folder_path: folder /no/such/clips does not exist")


def test_sample_start_step_is_a_key_and_its_typo_names_it(seed_raw, workdir) -> None:
    _process(seed_raw)["sample"]["sample_start_step"] = 400
    sample = parse_config(seed_raw, workdir=workdir).job.process.sample
    assert sample is not None and not sample.should_sample(400 - 400, final=False)
    assert [s for s in range(1, 1300) if sample.should_sample(s, final=False)] == [400, 800, 1200]
    _process(seed_raw)["sample"]["sample_start_stpe"] = 0
    with pytest.raises(ConfigError, match="sample_start_stpe: unknown key; did you mean sample_start_step"):
        parse_config(seed_raw, workdir=workdir)


@pytest.mark.parametrize(
    ("arch", "what"),
    [
        ("wan21", "Wan 2.1 text-to-video"),
        ("wan22_14b", "Wan 2.2 text-to-video A14B"),
        ("wan22_5b", "Wan 2.2 TI2V-5B"),
        ("flux", "not Wan 2.2 image-to-video"),
    ],
)
def test_other_archs_say_what_this_project_trains(seed_raw, workdir, arch, what) -> None:
    _process(seed_raw)["model"]["arch"] = arch
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, workdir=workdir)
    (problem,) = err.value.problems
    assert problem.startswith(f"model.arch: {arch!r} is {what}")
    assert "This project trains Wan 2.2 I2V-A14B LoRAs only" in problem
    assert "Input should be" not in problem and "Set arch: wan22_14b_i2v" in problem


def test_ai_toolkit_aliases(seed_raw, workdir) -> None:
    process = _process(seed_raw)
    network = process["network"]
    del network["linear"], network["linear_alpha"]
    network.update(rank=8, alpha=4)
    process["model"]["compile"] = True
    process["train"].update(unet_lr=1e-5, lr_scheduler="constant_with_warmup", lr_warmup_steps=50)
    process["train"]["optimizer"] = "adamw"
    job = parse_config(seed_raw, workdir=workdir).job
    net, train = job.process.network, job.process.train
    assert (net.linear, net.linear_alpha) == (8, 4)
    assert train.compile is True and train.lr_scheduler_params.num_warmup_steps == 50
    network["linear"] = 16  # rank and linear disagree
    process["train"]["unet_lr"] = 2e-4  # ai-toolkit trains LoRAs at train.lr
    with pytest.raises(ConfigError) as err:
        parse_config(seed_raw, workdir=workdir)
    assert [p.split(":")[0] for p in err.value.problems] == ["network.rank", "train.unet_lr"]
    assert "ai-toolkit trains a LoRA at train.lr" in err.value.problems[1]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"lr_scheduler": "cosine"}, "would not act on automagic"),
        (
            {"optimizer": "adamw", "lr_scheduler": "cosine", "lr_warmup_steps": 10},
            "num_warmup_steps not read",
        ),
        (
            {"optimizer": "adamw", "lr_scheduler": "cosine", "lr_scheduler_params": {"T_max": 9}},
            "set total_iters",
        ),
        ({"optimizer": "adamw", "lr_scheduler": "polynomial"}, "train.lr_scheduler: Input should be"),
    ],
)
def test_schedules_that_would_not_do_what_they_say(seed_raw, workdir, train, message) -> None:
    _process(seed_raw)["train"].update(train)
    with pytest.raises(ConfigError, match=message):
        parse_config(seed_raw, workdir=workdir)


def test_prodigy_lr_below_a_tenth_is_one_and_says_so(seed_raw, workdir) -> None:
    _process(seed_raw)["train"].update(optimizer="prodigy", lr=1e-4)
    loaded = parse_config(seed_raw, workdir=workdir)
    assert loaded.job.process.train.start_lr == 1.0
    assert any("with optimizer prodigy trains at lr 1.0" in w for w in loaded.warnings)
