"""Bring the weights you have (docs/architecture.md §3.1): the tiny model written as ComfyUI's single
files (bf16, fp8_scaled) and as the official Wan 2.2 release loads and computes what the diffusers
folder does; `check` names the key and path of a file that cannot be that part."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from wan_assets.cli import main
from wan_assets.core.config import ModelConfig, parse_config
from wan_assets.core.data.cache import EncoderHandle
from wan_assets.core.model.loading import WanComponents, load_wan_model, source_problems
from wan_assets.core.model.tiny import build_tiny_model

from . import wan_layouts
from .conftest import tiny_job_raw

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def layouts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    files = wan_layouts.write_comfyui(tiny_model_dir, root / "comfyui")
    files["official"] = wan_layouts.write_official(tiny_model_dir, root / "Wan2.2-I2V-A14B")
    return files


def _comfy_config(tiny_model_dir: Path, layouts: dict[str, Path], **override: str) -> ModelConfig:
    files = {
        "high_noise_path": layouts["high_noise"],
        "low_noise_path": layouts["low_noise"],
        "vae_path": layouts["vae"],
        "te_name_or_path": layouts["text_encoder"],
    }
    return ModelConfig(
        name_or_path=str(tiny_model_dir), **{**{k: str(v) for k, v in files.items()}, **override}
    )


def _outputs(parts: WanComponents) -> dict[str, torch.Tensor]:
    """Each part's forward on fixed inputs: both experts, the VAE encoder, the text encoder."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 36, 2, 8, 8, generator=gen, dtype=BF16)
    text = torch.randn(1, 6, 32, generator=gen, dtype=BF16)
    video = torch.rand(1, 3, 5, 16, 16, generator=gen) * 2 - 1
    out = {}
    with torch.no_grad():
        for expert in parts.loaded_experts:
            model = parts.expert(expert)
            inputs = (hidden.to(model.dtype), torch.tensor([500]), text.to(model.dtype))
            out[expert] = model(*inputs, return_dict=False)[0].float()
        if parts.vae is not None:
            out["vae"] = parts.vae.encode(video.to(parts.vae.dtype)).latent_dist.mode().float()
        if parts.text_encoder is not None and parts.tokenizer is not None:
            ids = parts.tokenizer(["a red ball rolls slowly"], return_tensors="pt")
            out["text_encoder"] = parts.text_encoder(
                ids.input_ids, ids.attention_mask
            ).last_hidden_state.float()
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    """The diffusers folder at the production dtype (bf16 experts and text encoder, fp32 VAE)."""
    return _outputs(load_wan_model(tiny_model_dir, dtype=BF16))


def test_comfyui_single_files_load_like_the_diffusers_folder(tiny_model_dir, layouts, reference) -> None:
    state = load_file(str(layouts["high_noise"]))
    assert "blocks.0.self_attn.q.weight" in state and "head.modulation" in state  # ComfyUI's names
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in load_file(str(layouts["text_encoder"]))
    parts = load_wan_model(_comfy_config(tiny_model_dir, layouts), dtype=BF16)
    assert parts.transformer_high.dtype == BF16 and parts.vae.dtype == torch.float32
    _assert_same(_outputs(parts), reference)


def test_official_release_layout_loads_like_the_diffusers_folder(tiny_model_dir, layouts, reference) -> None:
    root = layouts["official"]
    assert len(list((root / "high_noise_model").glob("*.safetensors"))) == 2
    official_t5 = torch.load(root / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    # wan/modules/t5.py names: T5Encoder.token_embedding, blocks[i].{attn,ffn.gate.0,pos_embedding}
    assert {
        "token_embedding.weight",
        "blocks.1.ffn.gate.0.weight",
        "blocks.0.pos_embedding.embedding.weight",
    } <= set(official_t5)
    assert "decoder.middle.0.residual.0.gamma" in torch.load(root / "Wan2.1_VAE.pth", weights_only=True)

    parts = load_wan_model(root, dtype=BF16)
    folder = load_wan_model(tiny_model_dir, load_experts=(), load_text_encoder=False, load_vae=False)
    assert parts.boundary_timestep == folder.boundary_timestep == 900.0
    settings = [
        {k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} for p in (parts, folder)
    ]
    assert settings[0] == settings[1]
    _assert_same(_outputs(parts), reference)
    assert source_problems(ModelConfig(name_or_path=str(root))) == []

    # ai-toolkit's extras_name_or_path: the VAE, text encoder, tokenizer and scheduler from elsewhere.
    mixed = ModelConfig(name_or_path=str(root), extras_name_or_path=str(tiny_model_dir))
    _assert_same(_outputs(load_wan_model(mixed, dtype=BF16)), reference)
    assert source_problems(mixed) == []


def test_fp8_scaled_files_are_dequantized_with_their_scales(tiny_model_dir, layouts) -> None:
    fp8 = load_file(str(layouts["high_noise_fp8"]))
    assert fp8["model.diffusion_model.blocks.0.self_attn.q.weight"].dtype == wan_layouts.FP8
    assert fp8["model.diffusion_model.blocks.0.self_attn.q.scale_weight"].ndim == 0
    config = _comfy_config(
        tiny_model_dir,
        layouts,
        high_noise_path=str(layouts["high_noise_fp8"]),
        te_name_or_path=str(layouts["text_encoder_fp8"]),
    )
    parts = load_wan_model(config, dtype=torch.float32, load_experts=("high_noise",), load_vae=False)

    # The same modules with the weights ComfyUI computes (weight * scale_weight) give the same outputs.
    want = load_wan_model(tiny_model_dir, load_experts=("high_noise",), load_vae=False)
    stripped = {k.removeprefix("model.diffusion_model."): v for k, v in fp8.items()}
    want.transformer_high.load_state_dict(_diffusers_names(wan_layouts.dequantized(stripped)))
    text = wan_layouts.dequantized(load_file(str(layouts["text_encoder_fp8"])))
    want.text_encoder.load_state_dict(text, strict=False)
    got, ref = _outputs(parts), _outputs(want)
    _assert_same(got, ref)
    exact = _outputs(load_wan_model(tiny_model_dir, load_experts=("high_noise",), load_vae=False))
    assert 0 < (got["high_noise"] - exact["high_noise"]).abs().max() < 0.1  # fp8 rounding, not a wrong scale


def _diffusers_names(wan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return {k: v.float() for k, v in convert_wan_transformer_to_diffusers(dict(wan)).items()}


def test_check_names_the_key_and_path_of_a_file_that_does_not_fit(tiny_model_dir, layouts, tmp_path) -> None:
    assert source_problems(_comfy_config(tiny_model_dir, layouts)) == []
    vae_as_expert = _comfy_config(tiny_model_dir, layouts, high_noise_path=str(layouts["vae"]))
    (problem,) = source_problems(vae_as_expert)
    assert problem.startswith(
        f"model.high_noise_path: {layouts['vae']} is not a Wan 2.2 transformer (expert)"
    )

    missing = _comfy_config(tiny_model_dir, layouts, vae_path=str(tmp_path / "nope.safetensors"))
    assert source_problems(missing) == [f"model.vae_path: {tmp_path / 'nope.safetensors'} does not exist"]

    bigger = build_tiny_model(tmp_path / "bigger", sizes={"transformer": {"ffn_dim": 128}})
    other = tmp_path / "other_expert.safetensors"
    save_file(wan_layouts.transformer_to_wan(wan_layouts.bf16_state(bigger, "transformer_2")), other)
    (problem,) = source_problems(_comfy_config(tiny_model_dir, layouts, low_noise_path=str(other)))
    assert problem.startswith(f"model.low_noise_path: {other} does not fit the model config: ")
    assert "blocks.0.ffn.net.0.proj.weight is (128, 48), expected (96, 48)" in problem
    with pytest.raises(ValueError, match=r"model\.low_noise_path: .* does not fit"):
        load_wan_model(_comfy_config(tiny_model_dir, layouts, low_noise_path=str(other)))


def test_official_layout_missing_a_part_is_named(layouts, tmp_path) -> None:
    partial = tmp_path / "release"
    shutil.copytree(layouts["official"], partial, ignore=shutil.ignore_patterns("Wan2.1_VAE.pth"))
    (problem,) = source_problems(ModelConfig(name_or_path=str(partial)))
    assert problem.startswith(
        f"model.name_or_path: model folder {partial} (the official Wan 2.2 release layout)"
    )
    assert "lacks Wan2.1_VAE.pth" in problem
    given = ModelConfig(name_or_path=str(partial), vae_path=str(layouts["vae"]))
    assert source_problems(given) == []


def test_config_keys_resolve_under_the_workdir(tiny_model_dir, clips_dir, tmp_path) -> None:
    raw = tiny_job_raw(clips_dir, tiny_model_dir)
    model = raw["config"]["process"][0]["model"]
    model.update(vae_path="weights/vae.safetensors", text_encoder_path="~/umt5.safetensors")
    job = parse_config(raw, workdir=tmp_path).job
    assert job.process.model.vae_path == str(tmp_path / "weights" / "vae.safetensors")
    assert job.process.model.te_name_or_path == str(Path("~/umt5.safetensors").expanduser())


def test_single_file_encoders_have_their_own_stable_cache_identity(tiny_model_dir, layouts, tmp_path) -> None:
    folder = EncoderHandle(str(tiny_model_dir)).identity()
    files = EncoderHandle(_comfy_config(tiny_model_dir, layouts)).identity()
    assert files == EncoderHandle(_comfy_config(tiny_model_dir, layouts)).identity()
    assert files["vae"] != folder["vae"] and files["text_encoder"] != folder["text_encoder"]
    assert files["tokenizer"] == folder["tokenizer"]
    changed = tmp_path / "vae.safetensors"
    state = load_file(str(layouts["vae"]))
    state["decoder.conv1.bias"] = state["decoder.conv1.bias"] + 1
    save_file(state, changed)
    moved = EncoderHandle(_comfy_config(tiny_model_dir, layouts, vae_path=str(changed))).identity()
    assert moved["vae"] != files["vae"]


def test_wan_assets_check_names_a_wrong_part_file(tiny_model_dir, layouts, tmp_path, capsys) -> None:
    clips = tmp_path / "data"
    clips.mkdir()
    (clips / "a.mp4").write_bytes(b"0")  # check looks for clips, it does not decode them
    raw = tiny_job_raw(clips, tiny_model_dir)
    raw["config"]["process"][0]["model"].update(high_noise_path=str(layouts["vae"]))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["check", str(config), "--workdir", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert f"model.high_noise_path: {layouts['vae']} is not a Wan 2.2 transformer (expert)" in err
