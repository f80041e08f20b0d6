"""Wan weights in the layouts users have, read into diffusers / transformers modules (docs/architecture.md §3.1).

A component's weights come as a state dict from one file (`.safetensors`, `.pth`, `.pt`) or a folder of
shards, in one of three key styles:
- diffusers (`blocks.0.attn1.to_q.weight`): loaded as they are;
- Wan-original, as the official release and ComfyUI's repackaged single files carry them
  (`blocks.0.self_attn.q.weight`, `decoder.middle.0.residual.0.gamma`): converted by diffusers' own
  `convert_wan_transformer_to_diffusers` / `convert_wan_vae_to_diffusers`;
- for UMT5: the official `models_t5_umt5-xxl-enc-bf16.pth` names (`blocks.0.attn.q.weight`, mapped by
  `OFFICIAL_T5_NAMES`: transformers has no converter) or transformers' names, which ComfyUI's
  `umt5_xxl_*.safetensors` use.
ComfyUI's `fp8_scaled` files store each linear weight in float8 with a `<module>.scale_weight` factor
and a top-level `scaled_fp8` marker (comfy/model_detection.py, comfy/ops.py `scaled_fp8_ops`); they
are dequantized here (weight * scale_weight) before conversion.

Everything runs on "meta" tensors too (shapes only), which is how `check` validates a file without
reading its weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from diffusers.models.model_loading_utils import load_model_dict_into_meta
from safetensors import safe_open
from transformers import UMT5Config, UMT5EncoderModel

Part = Literal["transformer", "vae", "text_encoder"]
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Prefixes single files put before a component's keys (ComfyUI checkpoints, ldm-style saves).
_PREFIXES: dict[Part, tuple[str, ...]] = {
    "transformer": ("model.diffusion_model.", "diffusion_model."),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer."),
}
# A key that only each key style has: (style, key).
_STYLES: dict[Part, tuple[tuple[str, str], ...]] = {
    "transformer": (("diffusers", "blocks.0.attn1.to_q.weight"), ("wan", "blocks.0.self_attn.q.weight")),
    "vae": (
        ("diffusers", "decoder.mid_block.resnets.0.norm1.gamma"),
        ("wan", "decoder.middle.0.residual.0.gamma"),
    ),
    "text_encoder": (
        ("diffusers", "encoder.block.0.layer.0.SelfAttention.q.weight"),
        ("wan", "blocks.0.attn.q.weight"),
    ),
}
_WHAT: dict[Part, str] = {
    "transformer": "a Wan 2.2 transformer (expert)",
    "vae": "the Wan 2.1 VAE",
    "text_encoder": "the UMT5-XXL text encoder",
}
# Official Wan T5 encoder (wan/modules/t5.py) -> transformers UMT5EncoderModel, per block `{i}`.
OFFICIAL_T5_NAMES: dict[str, str] = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.q.weight": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    "blocks.{i}.attn.k.weight": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    "blocks.{i}.attn.v.weight": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    "blocks.{i}.attn.o.weight": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    "blocks.{i}.pos_embedding.embedding.weight": "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    # T5FeedForward: fc2(fc1(x) * gate(x)), gate = Linear + GELU(tanh) = wi_0, fc1 = wi_1.
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
}
_TIED_T5 = "encoder.embed_tokens.weight"


class WeightsError(ValueError):
    """A weights file or folder that cannot be this component (wrong file, layout or shapes)."""


# --- reading ---------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The files holding a component: the file itself, or a folder's `*.safetensors` shards."""
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"{path} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise WeightsError(f"{path} does not exist")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"folder {path} holds no .safetensors shards")
    return shards


def read_state_dict(path: Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a file or shard folder; `meta`: shapes and dtypes only (nothing read)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        state.update(
            _read_safetensors(file, meta) if file.suffix == ".safetensors" else _read_pickle(file, meta)
        )
    return state


def _read_safetensors(file: Path, meta: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if meta:
                    part = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                    out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
                else:
                    out[key] = handle.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise WeightsError(f"{file} cannot be read as safetensors ({exc})") from None
    return out


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_pickle(file: Path, meta: bool) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise WeightsError(
            f"{file} cannot be read as a torch checkpoint ({exc.__class__.__name__})"
        ) from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightsError(f"{file} holds a {type(loaded).__name__}, not a state dict")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if meta:
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    return tensors


# --- to diffusers / transformers names -------------------------------------------------------------


def dequantize_fp8_scaled(
    state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout -> weights in `dtype` (weight * scale_weight, computed in float32
    one tensor at a time, so a 14B expert never exists in float32 whole); other tensors as they are."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(("scaled_fp8", ".scale_input")) or key.endswith(".scale_weight"):
            continue
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = state.get(key.removesuffix("weight") + "scale_weight")
            tensor = (tensor.float() * (scale.float() if scale is not None else 1.0)).to(dtype)
        out[key] = tensor
    return out


def to_diffusers_names(
    state: dict[str, torch.Tensor], part: Part, where: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The state dict of `part` in the names its diffusers / transformers class loads (fp8_scaled
    weights dequantized to `dtype`)."""
    state = _strip_prefix(dequantize_fp8_scaled(state, dtype), part)
    style = next((s for s, key in _STYLES[part] if key in state), None)
    if style is None:
        sample = ", ".join(sorted(state)[:3]) or "none"
        raise WeightsError(
            f"{where} is not {_WHAT[part]}: none of its keys has the names of one (first keys: {sample})"
        )
    if style == "diffusers":
        return state
    convert: dict[Part, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
        "transformer": lambda s: convert_wan_transformer_to_diffusers(dict(s)),
        "vae": lambda s: convert_wan_vae_to_diffusers(dict(s)),
        "text_encoder": _official_t5_to_transformers,
    }
    return convert[part](state)


def _strip_prefix(state: dict[str, torch.Tensor], part: Part) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES[part]:
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def _official_t5_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    patterns = {re.escape(k).replace(r"\{i\}", r"(\d+)") + "$": v for k, v in OFFICIAL_T5_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for pattern, target in patterns.items():
            match = re.match(pattern, key)
            if match:
                out[target.format(i=match[1]) if match.groups() else target] = tensor
                break
        else:
            out[key] = tensor  # reported as unexpected by the shape check
    return out


# --- configs that only the weights can tell ------------------------------------------------------------


def official_transformer_config(official: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers' WanTransformer3DModel config from the release's `config.json` (class WanModel)."""
    dim, num_heads = int(official["dim"]), int(official["num_heads"])
    return {
        "patch_size": tuple(state["patch_embedding.weight"].shape[2:]),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": int(official["in_dim"]),
        "out_channels": int(official["out_dim"]),
        "text_dim": int(state["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
        "freq_dim": int(official["freq_dim"]),
        "ffn_dim": int(official["ffn_dim"]),
        "num_layers": int(official["num_layers"]),
        "cross_attn_norm": True,  # Wan 2.2 I2V: cross_attn_norm=True, qk_norm=True (wan/configs)
        "qk_norm": "rms_norm_across_heads",
        "eps": float(official.get("eps", 1e-6)),
        "image_dim": None,
        "rope_max_seq_len": 1024,
    }


def vae_config_from_weights(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The Wan 2.1 VAE config (the class defaults are the release's) with widths read off the weights."""
    return {
        "base_dim": int(state["encoder.conv_in.weight"].shape[0]),
        "z_dim": int(state["post_quant_conv.weight"].shape[0]),
    }


def t5_config_from_weights(state: dict[str, torch.Tensor]) -> UMT5Config:
    """umt5-xxl's config (gated-gelu, per-layer relative attention) with sizes read off the weights."""
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # [buckets, heads]
    num_heads = int(bias.shape[1])
    vocab_size, d_model = state["shared.weight"].shape
    layers = {int(m[1]) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    sizes: dict[str, Any] = {"tie_word_embeddings": False}  # a PretrainedConfig kwarg mypy cannot see
    return UMT5Config(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        d_kv=int(state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // num_heads,
        d_ff=int(state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
        num_layers=len(layers),
        num_heads=num_heads,
        relative_attention_num_buckets=int(bias.shape[0]),
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        **sizes,
    )


# --- building modules ------------------------------------------------------------------------------


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """One error listing missing keys, unexpected keys and shape mismatches against the model config."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} is {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} tensors of another shape ({'; '.join(shapes[:2])})")
    if problems:
        raise WeightsError(
            f"{where} does not fit the model config: {', '.join(problems)}; is it the right file, "
            "and do the configs come from the same model?"
        )


def build_transformer(
    config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype, where: str
) -> WanTransformer3DModel:
    return _build_diffusers(WanTransformer3DModel, config, state, dtype, where)


def build_vae(
    config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype, where: str
) -> AutoencoderKLWan:
    return _build_diffusers(AutoencoderKLWan, config, state, dtype, where)


def _build_diffusers(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], dtype, where: str):
    # As from_pretrained builds it: empty, then the weights in `dtype`, the classes' fp32 modules kept
    # (diffusers' from_single_file casts those too, which would differ from the diffusers folder).
    with init_empty_weights():
        model = cls.from_config(config)
    check_state(model.state_dict(), state, where)
    load_model_dict_into_meta(
        model,
        state,
        dtype=dtype,
        device_map={"": torch.device("cpu")},
        keep_in_fp32_modules=list(cls._keep_in_fp32_modules or []),
    )
    return model.eval()


def expected_state(part: Part, config: dict[str, Any] | UMT5Config) -> dict[str, torch.Tensor]:
    """The state dict (meta tensors) a model of `config` loads: what `check` compares a file with."""
    with init_empty_weights():
        if part == "text_encoder":
            assert isinstance(config, UMT5Config)
            return _t5_keys(UMT5EncoderModel(config).state_dict())
        assert isinstance(config, dict)
        cls = WanTransformer3DModel if part == "transformer" else AutoencoderKLWan
        return cls.from_config(config).state_dict()


def build_text_encoder(
    config: UMT5Config, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str
) -> UMT5EncoderModel:
    state = dict(state)
    check_state(expected_state("text_encoder", config), _t5_keys(state), where)
    state.setdefault(_TIED_T5, state["shared.weight"])  # ComfyUI files keep only `shared`
    # transformers' own loading (dtype, fp32 modules, tied embeddings) over the given state dict.
    return UMT5EncoderModel.from_pretrained(None, config=config, state_dict=state, dtype=dtype).eval()


def _t5_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != _TIED_T5}
