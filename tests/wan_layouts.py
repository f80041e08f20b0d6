"""The tiny model written in the layouts users download: ComfyUI's single files (bf16 and fp8_scaled)
and the official Wan 2.2 release. Key names are the real ones: the reverse of diffusers' conversion
(checked by running diffusers' own converter over them), the official T5 names of wan/modules/t5.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import save_file
from transformers import AutoTokenizer, UMT5EncoderModel

from wan_assets.core.model.weights import OFFICIAL_T5_NAMES

FP8 = torch.float8_e4m3fn

# diffusers -> Wan-original transformer names, applied in order (inverse of diffusers' rename table).
_TRANSFORMER_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # diffusers' norm2 is Wan's cross-attention norm3 (norm2 has no weights)
    ("proj_out", "head.head"),
]


def transformer_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        new = key
        for old, wan in _TRANSFORMER_TO_WAN:
            new = new.replace(old, wan)
        new = re.sub(r"^scale_shift_table$", "head.modulation", new)
        new = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", new)
        out[new] = tensor
    _assert_inverse(out, state, convert_wan_transformer_to_diffusers)
    return out


_RESNET_TO_WAN = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma"}
_RESNET_TO_WAN |= {"conv2": "residual.6", "conv_shortcut": "shortcut"}


def vae_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {_vae_key(k): v for k, v in state.items()}
    _assert_inverse(out, state, convert_wan_vae_to_diffusers)
    return out


def _vae_key(key: str) -> str:
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    first, rest = key.split(".", 1)
    if first in top:
        return f"{top[first]}.{rest}"
    side, rest = key.split(".", 1)  # encoder / decoder
    for old, new in {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}.items():
        if rest.startswith(old + "."):
            return f"{side}.{new}{rest[len(old) :]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)\.(weight|bias|gamma)$", rest):
        return f"{side}.middle.{2 * int(m[1])}.{_resnet(m[2], m[3])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)$", rest):
        return f"{side}.middle.1.{m[1]}"
    if m := re.match(r"down_blocks\.(\d+)\.(.+)$", rest):
        inner = m[2]
        n = re.match(r"(.+)\.(weight|bias|gamma)$", inner)
        if n and (n[1] in _RESNET_TO_WAN or n[1] + "." + n[2] in _RESNET_TO_WAN):
            inner = _resnet(n[1], n[2])
        return f"{side}.downsamples.{m[1]}.{inner}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)\.(weight|bias|gamma)$", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + int(m[2])}.{_resnet(m[3], m[4])}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise AssertionError(f"no Wan name for VAE key {key}")


def _resnet(name: str, suffix: str) -> str:
    if name + "." + suffix in _RESNET_TO_WAN:
        return _RESNET_TO_WAN[name + "." + suffix]
    return f"{_RESNET_TO_WAN[name]}.{suffix}"


def t5_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    to_official = {v: k for k, v in OFFICIAL_T5_NAMES.items()}
    out = {}
    for key, tensor in state.items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight; the official encoder has one token_embedding
        generic = re.sub(r"block\.(\d+)\.", "block.{i}.", key)
        index = re.search(r"block\.(\d+)\.", key)
        out[to_official[generic].format(i=index[1] if index else "")] = tensor
    return out


def _assert_inverse(wan: dict, diffusers: dict, convert) -> None:
    back = convert(dict(wan))
    assert back.keys() == diffusers.keys(), sorted(back.keys() ^ diffusers.keys())[:4]


def fp8_scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout: linear weights in float8_e4m3fn with a float32 `scale_weight`
    (absmax / 448) each, the other tensors as they are, and the `scaled_fp8` marker."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2 and ("blocks." in key or "block." in key):
            scale = tensor.float().abs().max() / torch.finfo(FP8).max
            out[key] = (tensor.float() / scale).to(FP8)
            out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor
    return out


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI computes from `fp8_scaled`: weight * scale_weight, per linear."""
    return {
        k: v.float() * state[k.removesuffix("weight") + "scale_weight"] if v.dtype == FP8 else v
        for k, v in state.items()
        if not k.endswith(("scale_weight", "scaled_fp8"))
    }


# --- whole layouts ---------------------------------------------------------------------------------


def bf16_state(model_dir: Path, subfolder: str) -> dict[str, torch.Tensor]:
    """A component as `from_pretrained(torch_dtype=bf16)` holds it (the fp32 modules stay fp32): the
    tensors a bf16 single file carries. The VAE stays float32, as training runs it (and as the
    official Wan2.1_VAE.pth stores it), so its outputs can be compared exactly."""
    if subfolder == "text_encoder":
        model = UMT5EncoderModel.from_pretrained(model_dir, subfolder=subfolder, dtype=torch.bfloat16)
    elif subfolder == "vae":
        model = AutoencoderKLWan.from_pretrained(model_dir, subfolder=subfolder)
    else:
        model = WanTransformer3DModel.from_pretrained(
            model_dir, subfolder=subfolder, torch_dtype=torch.bfloat16
        )
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_comfyui(model_dir: Path, out: Path) -> dict[str, Path]:
    """ComfyUI's files for the tiny model: both experts, VAE and UMT5, bf16 and fp8_scaled."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "high_noise": out / "wan2.2_i2v_high_noise_14B_bf16.safetensors",
        "low_noise": out / "wan2.2_i2v_low_noise_14B_bf16.safetensors",
        "vae": out / "wan_2.1_vae.safetensors",
        "text_encoder": out / "umt5_xxl_bf16.safetensors",
        "high_noise_fp8": out / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
        "text_encoder_fp8": out / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    }
    high = transformer_to_wan(bf16_state(model_dir, "transformer"))
    save_file(high, files["high_noise"])
    save_file(transformer_to_wan(bf16_state(model_dir, "transformer_2")), files["low_noise"])
    save_file(vae_to_wan(bf16_state(model_dir, "vae")), files["vae"])
    text = {
        k: v for k, v in bf16_state(model_dir, "text_encoder").items() if k != "encoder.embed_tokens.weight"
    }
    save_file(text, files["text_encoder"])
    # ComfyUI's checkpoints put the diffusion model under model.diffusion_model.
    save_file({f"model.diffusion_model.{k}": v for k, v in fp8_scaled(high).items()}, files["high_noise_fp8"])
    save_file(fp8_scaled(text), files["text_encoder_fp8"])
    return files


def write_official(model_dir: Path, out: Path) -> Path:
    """The Wan2.2-I2V-A14B release layout: sharded experts with config.json, the .pth encoders, the
    tokenizer under google/umt5-xxl."""
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    official = {
        "_class_name": "WanModel",
        "model_type": "i2v",
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "in_dim": config["in_channels"],
        "out_dim": config["out_channels"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "eps": config["eps"],
        "text_len": 512,
    }
    for subfolder, name in (("transformer", "high_noise_model"), ("transformer_2", "low_noise_model")):
        folder = out / name
        folder.mkdir(parents=True)
        state = transformer_to_wan(bf16_state(model_dir, subfolder))
        keys = sorted(state)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k] for k in shard}, folder / file)
            weight_map |= dict.fromkeys(shard, file)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text(json.dumps(official))
    torch.save(t5_to_official(bf16_state(model_dir, "text_encoder")), out / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(vae_to_wan(bf16_state(model_dir, "vae")), out / "Wan2.1_VAE.pth")
    AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer").save_pretrained(
        out / "google" / "umt5-xxl"
    )
    return out
