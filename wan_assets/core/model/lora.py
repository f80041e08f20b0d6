"""LoRA / LoKr adapters on the Wan expert block linears, and their ComfyUI-layout files (docs/architecture.md §5, §5.1).

Training uses peft adapters inside the diffusers `WanTransformer3DModel`; files use the Wan-original
names (`diffusion_model.blocks.N.self_attn.q...`) that ComfyUI and diffusers' `load_lora_weights`
read. Scale = alpha / rank everywhere: peft's per-layer `scaling`, and the `.alpha` scalars in files.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from diffusers import WanTransformer3DModel
from peft import LoKrConfig, LoraConfig
from peft.tuners.lokr.layer import LoKrLayer
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from wan_assets.core.config import NetworkConfig, NetworkKwargs
from wan_assets.core.files import write_safetensors
from wan_assets.core.model.lora_gemm import Float8LoraMatmul, linear_lora
from wan_assets.core.model.quantize import Float8FrozenLinear

logger = logging.getLogger(__name__)

# The one diffusers <-> Wan-original (ComfyUI) name table for the adapted linears of a block.
# Wan 2.2 I2V has no CLIP image branch, so attn2 has no add_k_proj / add_v_proj (k_img / v_img).
COMFY_NAMES: dict[str, str] = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
TARGET_SUFFIXES: tuple[str, ...] = tuple(COMFY_NAMES)
COMFY_PREFIX = "diffusion_model."
# ai-toolkit names the model `transformer`; its users write filters such as "transformer.blocks.0.".
FILTER_PREFIX = "transformer."

# The adapter's name inside each expert: the same in both, so that the compiled block graphs (which
# guard on the names they index by) serve both experts (speed/options.py).
TRAINED_ADAPTER = "trained"

_TARGET = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in TARGET_SUFFIXES) + r")")
# LoKr factors whose presence gives a module a rank; LyCORIS/ComfyUI apply alpha / rank only then.
_LOKR_FACTORED = ("lokr_w1_a", "lokr_w2_a")


# --- which modules ---------------------------------------------------------------------------------


def select_modules(transformer: torch.nn.Module, network: NetworkConfig) -> list[str]:
    """Full diffusers names of the block linears to adapt, after the network_kwargs filters."""
    candidates = [name for name, _ in transformer.named_modules() if _TARGET.fullmatch(name)]
    assert candidates, "no Wan block linears found: is this a WanTransformer3DModel?"
    kwargs = network.network_kwargs
    selected = [
        name
        for name in candidates
        if (not kwargs.only_if_contains or _contains_any(name, kwargs.only_if_contains))
        and not _contains_any(name, kwargs.ignore_if_contains)
    ]
    if not selected:
        raise ValueError(
            f"network.network_kwargs selects no module: only_if_contains={kwargs.only_if_contains}, "
            f"ignore_if_contains={kwargs.ignore_if_contains} (ignore wins). Filters are substrings of "
            f"diffusers module names such as {candidates[0]!r} or {FILTER_PREFIX + candidates[-1]!r}; "
            "loosen the filters"
        )
    return selected


def _contains_any(name: str, filters: list[str]) -> bool:
    return any(f in name or f in FILTER_PREFIX + name for f in filters)


# --- adding and scaling ----------------------------------------------------------------------------


def add_lora(
    transformer: WanTransformer3DModel, network: NetworkConfig, adapter_name: str, *, seed: int
) -> list[torch.nn.Parameter]:
    """Inject a LoRA (or LoKr) adapter; return its parameters, the only ones left trainable.

    Initial weights depend on `seed` alone; the caller's global RNG is left untouched.
    """
    modules = select_modules(transformer, network)
    config = (
        _lokr_config(transformer, network, modules)
        if network.type == "lokr"
        else _lora_config(network, modules)
    )
    # peft creates and initialises adapter weights on the CPU (then moves them), so forking and
    # seeding the CPU generator is enough; torch.manual_seed would also reseed every CUDA device.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=adapter_name)  # diffusers: keeps peft_config
    # LoKr full rank has no rank of its own; the configured one is the nominal rank of scale = alpha / rank.
    for layer in _layers(transformer, adapter_name).values():
        layer.r[adapter_name] = network.linear
    set_lora_scale(transformer, network.linear_alpha, adapter_name)
    params = adapter_parameters(transformer, adapter_name)
    transformer.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    return params


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear with the adapter product added to the base output inside one buffer.

    peft computes `base(x) + lora_B(lora_A(x)) * scale`: the B product, the scaling and the sum are
    three full-size tensors. Here the base GEMM writes the output and the LoRA GEMM accumulates
    `lora_A(x) @ (scale B)^T` into it (`lora_gemm.linear_lora`, or `Float8LoraMatmul` on an fp8
    base; rounded once, in fp32 accumulation). Selective checkpointing then keeps one output per
    linear instead of the base's and the B product's (speed/options.py). Other base layers
    (weight-only quantized) take `addmm(base(x), lora_A(x), B^T)`, which copies the base output
    once. Anything but one plain active adapter (merged, disabled, several adapters, DoRA and other
    variants, extra arguments) takes peft's own forward.

    The scale is read from `wan_scale`, a 0-dim fp32 buffer that `set_lora_scale` fills in place, and
    multiplies the small up-projection weight (r x out) before the GEMM: a compiled graph takes it
    as an input, so an alpha phase change reuses the graph instead of compiling a new one (peft's
    float `scaling` would be a constant of the graph).
    """

    wan_scale: torch.Tensor
    wan_scale_name: str

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return super().forward(x, *args, **kwargs)
        low = self.lora_A[name](
            self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype))
        )
        up = self.lora_B[name].weight
        if name == self.wan_scale_name:
            # The graph's scale input, in the weight's fp32; autocast rounds the product to bf16 once.
            # (peft's float `scaling` is not read here: a compiled graph would guard on its value.)
            up, alpha = up * self.wan_scale, 1.0
            fused = _one_buffer(self.base_layer, x, low, up)
            if fused is not None:
                return fused
        else:
            alpha = self.scaling[name]
        result = self.base_layer(x)
        if not torch.is_autocast_enabled(result.device.type) and not result.dtype == low.dtype == up.dtype:
            # Mixed dtypes without autocast: peft's arithmetic and promotion.
            return (result + self.lora_B[name](low) * self.scaling[name]).to(result.dtype)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), up.t(), alpha=alpha
        )
        return out.view(result.shape).to(result.dtype)


def _one_buffer(
    base: torch.nn.Module, x: torch.Tensor, low: torch.Tensor, up: torch.Tensor
) -> torch.Tensor | None:
    """base(x) + low @ up^T by lora_gemm's one-buffer ops, or None where they do not apply (another
    base layer, or mixed dtypes without autocast)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    lead, low_2d = x.shape[:-1], low.reshape(-1, low.shape[-1])
    # A plain weight: torchao's weight-only quantization keeps nn.Linear with a tensor subclass.
    if type(base) is torch.nn.Linear and type(base.weight) in (torch.nn.Parameter, torch.Tensor):
        linear = cast(torch.nn.Linear, base)
        if autocast:
            dtype = torch.get_autocast_dtype(device)
        elif x.dtype == linear.weight.dtype == low.dtype == up.dtype:
            dtype = x.dtype
        else:
            return None
        bias = linear.bias.to(dtype) if linear.bias is not None else None
        x_2d = x.reshape(-1, linear.in_features).to(dtype)
        out = linear_lora(x_2d, linear.weight.to(dtype), bias, low_2d.to(dtype), up.to(dtype))
        return out.view(*lead, linear.out_features)
    if type(base) is Float8FrozenLinear:
        fp8 = cast(Float8FrozenLinear, base)
        bf16 = torch.bfloat16
        if not autocast and not low.dtype == up.dtype == bf16:
            return None
        out = Float8LoraMatmul.apply(
            x.reshape(-1, fp8.in_features),
            fp8.weight_fp8,
            fp8.weight_scale,
            fp8.weight_fp8_t,
            fp8.bias,
            low_2d.to(bf16),
            up.to(bf16),
        )
        return out.view(*lead, fp8.out_features)
    return None


def fuse_lora_linears(transformer: torch.nn.Module) -> int:
    """Give every plain peft LoRA Linear the fused forward (same weights, names and files); how many."""
    fused = 0
    for module in transformer.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            layer = cast(FusedLoraLinear, module)
            name = layer.active_adapters[0]
            # Not persistent: the state dict and the files stay peft's; .to() moves it with the layer.
            up = layer.lora_B[name].weight
            layer.register_buffer(
                "wan_scale",
                torch.tensor(layer.scaling[name], dtype=torch.float32, device=up.device),
                persistent=False,
            )
            layer.wan_scale_name = name
            fused += 1
    return fused


def _lora_config(network: NetworkConfig, modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=network.linear,
        lora_alpha=network.linear_alpha,
        target_modules=modules,
        lora_dropout=network.dropout,
        init_lora_weights=True,
    )


def _lokr_config(transformer: torch.nn.Module, network: NetworkConfig, modules: list[str]) -> LoKrConfig:
    if network.dropout:
        # As in ai-toolkit and LyCORIS: LoKr has no dropout on its input.
        logger.warning("network.dropout=%s is ignored for type: lokr", network.dropout)
    rank = network.linear
    if network.lokr_full_rank:
        # peft keeps both Kronecker factors whole once r >= half the larger factor side; no side
        # exceeds the largest feature count.
        rank = max(max(m.in_features, m.out_features) for m in _named(transformer, modules))
    return LoKrConfig(
        r=rank,
        alpha=network.linear_alpha,
        target_modules=modules,
        decompose_factor=network.lokr_factor,
        init_weights=True,
    )


def _named(transformer: torch.nn.Module, names: list[str]) -> Iterator[torch.nn.Linear]:
    modules = dict(transformer.named_modules())
    return (modules[name] for name in names)


def set_lora_scale(transformer: torch.nn.Module, alpha: float, adapter_name: str) -> None:
    """Make the scale of every module of `adapter_name` alpha / rank (the alpha schedule's lever)."""
    layers = _layers(transformer, adapter_name)
    assert layers, f"adapter {adapter_name!r} is not in this transformer"
    for layer in layers.values():
        # peft recomputes scaling from the stored alpha (set_scale / unscale_layer, used by
        # diffusers' set_adapters and attention_kwargs scale), so both must agree.
        alphas = layer.lora_alpha if isinstance(layer, LoraLayer) else layer.alpha
        alphas[adapter_name] = alpha
        layer.scaling[adapter_name] = alpha / layer.r[adapter_name]
        if isinstance(layer, FusedLoraLinear) and layer.wan_scale_name == adapter_name:
            with torch.no_grad():
                layer.wan_scale.fill_(layer.scaling[adapter_name])  # in place: compiled graphs read it
    config = getattr(transformer, "peft_config", {}).get(adapter_name)
    if config is not None:
        setattr(config, "lora_alpha" if isinstance(config, LoraConfig) else "alpha", alpha)


def lora_scale(transformer: torch.nn.Module, adapter_name: str) -> float:
    """The scale (alpha / rank) in force; every module of the adapter has the same one."""
    scales = {layer.scaling[adapter_name] for layer in _layers(transformer, adapter_name).values()}
    assert len(scales) == 1, f"adapter {adapter_name!r} has scales {sorted(scales)}, expected one"
    return scales.pop()


def adapter_parameters(transformer: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    """The weights of `adapter_name`, module by module in a fixed order."""
    return [
        p
        for layer in _layers(transformer, adapter_name).values()
        for p in _weights(layer, adapter_name).values()
    ]


def _layers(transformer: torch.nn.Module, adapter_name: str) -> dict[str, BaseTunerLayer]:
    """diffusers module name -> peft layer that holds `adapter_name`."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in module.scaling
    }


def _weights(layer: BaseTunerLayer, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """One layer's adapter weights under their file suffixes (`lora_A.weight`, `lokr_w1`, ...)."""
    if isinstance(layer, LoraLayer):
        return {
            "lora_A.weight": layer.lora_A[adapter_name].weight,
            "lora_B.weight": layer.lora_B[adapter_name].weight,
        }
    assert isinstance(layer, LoKrLayer), type(layer)
    # peft's LoKr parameter names are LyCORIS's key suffixes.
    return {
        n: getattr(layer, n)[adapter_name]
        for n in layer.adapter_layer_names
        if adapter_name in getattr(layer, n)
    }


def _file_factor(layer: BaseTunerLayer, suffix: str, adapter_name: str) -> float:
    """Factor between a weight in the file and in peft.

    LyCORIS/ComfyUI scale a LoKr module by alpha / rank only if one Kronecker factor is low-rank, and by
    1.0 when both are whole; peft always applies alpha / rank. So a whole-factor module carries its
    scale inside lokr_w1 in the file.
    """
    if suffix != "lokr_w1" or _scaled_by_alpha(layer, adapter_name):
        return 1.0
    return layer.scaling[adapter_name]


def _scaled_by_alpha(layer: BaseTunerLayer, adapter_name: str) -> bool:
    """Whether LoRA tools apply alpha / rank to this module (LoRA, or LoKr with a low-rank factor)."""
    return isinstance(layer, LoraLayer) or any(adapter_name in getattr(layer, n) for n in _LOKR_FACTORED)


def _module_alpha(layer: BaseTunerLayer, adapter_name: str, alpha: float) -> float:
    # A whole-factor LoKr module is applied at scale 1 (its scale is in lokr_w1): its `.alpha` is the
    # rank, as LyCORIS writes it, so alpha / rank says 1 to every reader.
    return alpha if _scaled_by_alpha(layer, adapter_name) else float(layer.r[adapter_name])


def exported_alpha(transformer: torch.nn.Module, adapter_name: str, alpha: float) -> float:
    """The alpha a file of this adapter declares (`ss_network_alpha`): `alpha`, or for full-rank LoKr
    (every module whole, scale baked into lokr_w1) the rank, so that alpha / rank = 1 as applied."""
    layers = list(_layers(transformer, adapter_name).values())
    if any(_scaled_by_alpha(layer, adapter_name) for layer in layers):
        return alpha
    return float(layers[0].r[adapter_name])


# --- files -----------------------------------------------------------------------------------------


def comfy_module_name(name: str) -> str:
    """`blocks.3.attn1.to_q` -> `diffusion_model.blocks.3.self_attn.q`."""
    match = _TARGET.fullmatch(name)
    assert match, f"{name!r} is not an adaptable Wan block linear"
    return f"{COMFY_PREFIX}blocks.{match[1]}.{COMFY_NAMES[match[2]]}"


def lora_state_dict_comfy(
    transformer: torch.nn.Module, adapter_name: str, alpha: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The adapter in the Wan-original layout, with a `<module>.alpha` scalar per module."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in _layers(transformer, adapter_name).items():
        scale = layer.scaling[adapter_name]
        assert abs(scale - alpha / layer.r[adapter_name]) <= 1e-6 * abs(scale), (
            f"alpha {alpha} is not in force on {name} (scale {scale}); call set_lora_scale first"
        )
        module = comfy_module_name(name)
        for suffix, weight in _weights(layer, adapter_name).items():
            file_weight = weight.detach().float() * _file_factor(layer, suffix, adapter_name)
            state[f"{module}.{suffix}"] = file_weight.to("cpu", dtype).clone()
        # fp32 whatever `dtype`: alpha like 0.3 would round in bf16 and shift the loaded scale.
        state[f"{module}.alpha"] = torch.tensor(
            _module_alpha(layer, adapter_name, alpha), dtype=torch.float32
        )
    return state


def save_lora(
    path: Path,
    transformer: torch.nn.Module,
    adapter_name: str,
    alpha: float,
    *,
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> Path:
    """Write the adapter atomically as a ComfyUI / diffusers-loadable safetensors file."""
    not_strings = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if not_strings:
        raise TypeError(f"safetensors metadata values must be strings; not strings: {not_strings}")
    return write_safetensors(
        Path(path), lora_state_dict_comfy(transformer, adapter_name, alpha, dtype), metadata
    )


def load_lora_into(transformer: torch.nn.Module, path: Path, adapter_name: str) -> float:
    """Load a file written by `save_lora` into the existing adapter `adapter_name`; return its alpha.

    The adapter must have been added with the run's network config (`add_lora`), so module set, type
    and rank match the file; weights and scale are then set from the file.
    """
    layers = _layers(transformer, adapter_name)
    if not layers:
        raise ValueError(
            f"cannot load {path}: the transformer has no adapter {adapter_name!r}; "
            "add it first with add_lora(transformer, <the run's network config>, adapter_name, seed=...)"
        )
    state = load_file(str(path))
    _check_keys(path, state, _expected_keys(layers, adapter_name))
    alpha = _file_alpha(path, state)
    set_lora_scale(transformer, alpha, adapter_name)
    with torch.no_grad():
        for name, layer in layers.items():
            module = comfy_module_name(name)
            for suffix, weight in _weights(layer, adapter_name).items():
                file_weight = state[f"{module}.{suffix}"].float()
                if file_weight.shape != weight.shape:
                    raise ValueError(
                        f"{path}: {module}.{suffix} has shape {tuple(file_weight.shape)}, the adapter "
                        f"{tuple(weight.shape)}; it was trained with another rank or lokr_factor"
                    )
                weight.copy_(file_weight / _file_factor(layer, suffix, adapter_name))
    return alpha


def _expected_keys(layers: dict[str, BaseTunerLayer], adapter_name: str) -> set[str]:
    keys = set()
    for name, layer in layers.items():
        module = comfy_module_name(name)
        keys |= {f"{module}.{suffix}" for suffix in (*_weights(layer, adapter_name), "alpha")}
    return keys


def _check_keys(path: Path, state: dict[str, torch.Tensor], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the adapter: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}); it was trained with another "
            "network config (type, rank or network_kwargs filters)"
        )


def _file_alpha(path: Path, state: dict[str, torch.Tensor]) -> float:
    """The alpha of the modules scaled by alpha / rank; for full-rank LoKr (none is) the rank they all
    carry, which loads at scale 1 with lokr_w1 as it is."""
    modules = [k.removesuffix(".alpha") for k in state if k.endswith(".alpha")]
    scaled = [m for m in modules if not {f"{m}.lokr_w1", f"{m}.lokr_w2"} <= state.keys()]
    alphas = {state[f"{m}.alpha"].item() for m in scaled or modules}
    if len(alphas) != 1:
        raise ValueError(f"{path}: expected one alpha shared by all modules, found {sorted(alphas)}")
    return alphas.pop()


# --- files from elsewhere (diffusers users) ------------------------------------------------------------


def load_adapter_file(transformer: WanTransformer3DModel, path: Path, adapter_name: str = "default") -> float:
    """Put an exported LoRA or LoKr file onto a diffusers `WanTransformer3DModel` (e.g. a
    `WanImageToVideoPipeline`'s `transformer` / `transformer_2`); return the file's alpha.

    diffusers' own `load_lora_weights` reads LoRA files but not LoKr; this reads both. The network
    (type, rank, LoKr factor, modules) comes from the file's keys and `ss_*` metadata.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata() or {}
    add_lora(transformer, network_of_file(path, keys, metadata), adapter_name, seed=0)
    return load_lora_into(transformer, path, adapter_name)


def network_of_file(path: Path, keys: list[str], metadata: dict[str, str]) -> NetworkConfig:
    """The network config an exported file was trained with, as far as loading needs it."""
    modules = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".alpha")})
    lokr = any(".lokr_" in k for k in keys)
    if not modules or not all(m.startswith(COMFY_PREFIX) for m in modules):
        raise ValueError(
            f"{path} is not a Wan LoRA / LoKr file in the ComfyUI layout (diffusion_model.* keys)"
        )
    rank = metadata.get("ss_network_dim")
    args = json.loads(metadata.get("ss_network_args") or "{}")
    if rank is None and lokr:
        raise ValueError(f"{path}: a LoKr file needs its ss_network_dim metadata (the nominal rank) to load")
    if rank is None:
        with safe_open(str(path), framework="pt") as handle:
            rank = str(handle.get_slice(f"{modules[0]}.lora_A.weight").get_shape()[0])
    kwargs = NetworkKwargs(only_if_contains=[FILTER_PREFIX + _diffusers_module_name(m) for m in modules])
    return NetworkConfig(
        type="lokr" if lokr else "lora",
        linear=int(rank),
        lokr_factor=int(args.get("factor", -1)),
        lokr_full_rank=str(args.get("full_matrix", "False")).lower() == "true",
        network_kwargs=kwargs,
    )


def _diffusers_module_name(comfy: str) -> str:
    """`diffusion_model.blocks.3.self_attn.q` -> `blocks.3.attn1.to_q` (inverse of comfy_module_name)."""
    diffusers_of = {v: k for k, v in COMFY_NAMES.items()}
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", comfy.removeprefix(COMFY_PREFIX))
    if not match or match[2] not in diffusers_of:
        raise ValueError(f"{comfy!r} is not an adapted Wan block linear")
    return f"blocks.{match[1]}.{diffusers_of[match[2]]}"
