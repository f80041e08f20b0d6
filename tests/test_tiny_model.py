"""The embedded tiny model and the one loader: layout, determinism, I2V inference, routing, errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from transformers import AutoTokenizer

from wan_assets.core.experts import (
    EXPERTS,
    boundary_timestep,
    expert_for_timestep,
    timestep_window,
)
from wan_assets.core.model.loading import WanComponents, load_wan_model
from wan_assets.core.model.tiny import MARKER_FILE, TINY_TRANSFORMER, build_tiny_model

SUBFOLDERS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")
HEIGHT = WIDTH = 64  # multiple of 16 = VAE 8x * patch 2
NUM_FRAMES = 5  # 4k+1: two latent frames


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> WanComponents:
    return load_wan_model(tiny_model_dir)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _first_frame() -> PIL.Image.Image:
    pixels_hwc = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels_hwc)


def _sample(pipe: WanImageToVideoPipeline) -> np.ndarray:
    out = pipe(
        image=_first_frame(),
        prompt="a red ball rolls slowly to the left",
        negative_prompt="blurry, static",
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.frames


def test_layout_and_model_index(tiny_model_dir: Path) -> None:
    for sub in SUBFOLDERS:
        assert (tiny_model_dir / sub).is_dir(), sub
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["boundary_ratio"] == 0.9 and index["expand_timesteps"] is False
    assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None]
    assert json.loads((tiny_model_dir / MARKER_FILE).read_text())["seed"] == 0
    assert sum(len(b) for b in _files(tiny_model_dir).values()) < 10 * 2**20


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = _files(build_tiny_model(tmp_path / "a", seed=0))
    again = _files(build_tiny_model(tmp_path / "b", seed=0))
    other = _files(build_tiny_model(tmp_path / "c", seed=1))
    assert first == again
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert first[weights] != other[weights]
    # Rebuilding over an earlier tiny build is allowed; over anything else it is refused.
    build_tiny_model(tmp_path / "a", seed=0)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="user"):
        build_tiny_model(tmp_path / "user")


def test_experts_share_config_but_not_weights(components: WanComponents) -> None:
    high, low = components.expert("high_noise"), components.expert("low_noise")
    assert dict(high.config) == dict(low.config)
    assert high.config.in_channels == 36 and high.config.image_dim is None
    assert high.config.text_dim == components.text_encoder.config.d_model
    assert high.config.attention_head_dim == TINY_TRANSFORMER["attention_head_dim"]
    high_w, low_w = high.state_dict(), low.state_dict()
    assert any(not torch.equal(high_w[k], low_w[k]) for k in high_w)
    assert not any(p.requires_grad for p in high.parameters())


def test_scheduler_and_vae_are_wan22_i2v(components: WanComponents) -> None:
    cfg = components.scheduler.config
    assert type(components.scheduler).__name__ == "UniPCMultistepScheduler"
    assert (cfg.prediction_type, cfg.use_flow_sigmas, cfg.flow_shift) == ("flow_prediction", True, 5.0)
    vae = components.vae.config
    assert (vae.z_dim, vae.scale_factor_temporal, vae.scale_factor_spatial) == (16, 4, 8)
    assert len(vae.latents_mean) == len(vae.latents_std) == 16


def test_tokenizer_encodes_like_the_pipeline(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    batch = tok(
        ["a red ball rolls left", "zebra"],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, 512)
    assert batch.attention_mask.sum(dim=1).tolist() == [6, 6]  # 5 pieces + </s> each
    assert batch.input_ids[0, 5] == tok.eos_token_id == 1 and batch.input_ids[0, 6] == tok.pad_token_id == 0
    assert tok.tokenize("a red ball rolls left") == ["▁a", "▁red", "▁ball", "▁rolls", "▁left"]
    # Unknown words are spelled out, not mapped to <unk> (id 2).
    assert tok.tokenize("zebra") == ["▁z", "e", "b", "r", "a"] and tok.unk_token_id == 2


def test_i2v_inference_same_through_diffusers_and_loader(
    tiny_model_dir: Path, components: WanComponents
) -> None:
    reference = _sample(WanImageToVideoPipeline.from_pretrained(tiny_model_dir))
    pipe = components.build_pipeline()
    calls = dict.fromkeys(EXPERTS, 0)
    hooks = [
        components.expert(e).register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
        for e in EXPERTS
    ]
    frames = _sample(pipe)
    for hook in hooks:
        hook.remove()
    assert frames.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.isfinite(frames).all()
    np.testing.assert_allclose(frames, reference, atol=1e-5)
    # 2 UniPC steps at shift 5 are t=999 (high) then t=833 (low), each with a CFG pair of calls.
    assert calls == {"high_noise": 2, "low_noise": 2}


def test_boundary_and_routing(components: WanComponents) -> None:
    assert components.boundary_ratio == 0.9
    assert components.boundary_timestep == boundary_timestep(0.9) == 900
    assert expert_for_timestep(901, 900) == "high_noise"
    assert expert_for_timestep(900, 900) == "low_noise"
    assert expert_for_timestep(1000, 900) == "high_noise" and expert_for_timestep(0, 900) == "low_noise"
    assert timestep_window("high_noise", 900) == (900, 1000)
    assert timestep_window("low_noise", 900) == (0, 900)
    with pytest.raises(ValueError, match="1001"):
        expert_for_timestep(1001, 900)
    with pytest.raises(ValueError, match="mid_noise"):
        timestep_window("mid_noise", 900)


def test_partial_load(tiny_model_dir: Path) -> None:
    parts = load_wan_model(tiny_model_dir, load_experts=("low_noise",), load_text_encoder=False)
    assert parts.transformer_high is None and parts.transformer_low is not None
    assert parts.tokenizer is None and parts.text_encoder is None and parts.vae is not None
    assert parts.loaded_experts == ("low_noise",)
    with pytest.raises(ValueError, match="high_noise"):
        parts.expert("high_noise")
    with pytest.raises(ValueError, match="text_encoder"):
        parts.build_pipeline()


def test_loader_errors_name_the_problem(tmp_path: Path, tiny_model_dir: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_wan_model(missing)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial, ignore=shutil.ignore_patterns("transformer_2"))
    with pytest.raises(FileNotFoundError, match="transformer_2/"):
        load_wan_model(partial)
    load_wan_model(partial, load_experts=("high_noise",), load_text_encoder=False, load_vae=False)
    with pytest.raises(ValueError, match="'sage' is inference-only"):
        load_wan_model(tiny_model_dir, attention_backend="sage", training=True)
    with pytest.raises(ValueError, match=r"'xformerz'.*sdpa"):
        load_wan_model(tiny_model_dir, attention_backend="xformerz")
    with pytest.raises(ValueError, match="unknown expert 'mid'"):
        load_wan_model(tiny_model_dir, load_experts=("mid",))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_backend_needs_flash_attn(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="flash-attn"):
        load_wan_model(tiny_model_dir, attention_backend="flash")


def test_not_a_wan22_i2v_model(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="WanPipeline"):
        load_wan_model(tmp_path)
