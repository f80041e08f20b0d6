"""LoRA / LoKr on the tiny model: module filters, scale vs merged weights, export parity with diffusers'
own loader, and save -> load round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from wan_assets.core.config import NetworkConfig, NetworkKwargs
from wan_assets.core.model.loading import WanComponents, load_wan_model
from wan_assets.core.model.lora import (
    COMFY_NAMES,
    TARGET_SUFFIXES,
    adapter_parameters,
    add_lora,
    comfy_module_name,
    exported_alpha,
    load_lora_into,
    lora_scale,
    lora_state_dict_comfy,
    save_lora,
    select_modules,
    set_lora_scale,
)
from wan_assets.core.model.tiny import TINY_TRANSFORMER

RANK, ALPHA = 4, 3.0  # scale 0.75: a scale of 1.0 would hide a dropped or ignored alpha
NUM_LAYERS = TINY_TRANSFORMER["num_layers"]
FP32_TOL = 1e-5


def _network(**kwargs: object) -> NetworkConfig:
    return NetworkConfig(linear=RANK, linear_alpha=ALPHA, **kwargs)


def _filters(only: list[str] | None = None, ignore: list[str] | None = None) -> NetworkConfig:
    return _network(
        network_kwargs=NetworkKwargs(only_if_contains=only or [], ignore_if_contains=ignore or [])
    )


def _experts(model_dir: Path) -> WanComponents:
    return load_wan_model(model_dir, load_text_encoder=False, load_vae=False)


def _transformer(model_dir: Path) -> WanTransformer3DModel:
    return load_wan_model(
        model_dir, load_experts=("high_noise",), load_text_encoder=False, load_vae=False
    ).transformer_high


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, TINY_TRANSFORMER["in_channels"], 2, 8, 8, generator=g),  # b c t h w
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 7, TINY_TRANSFORMER["text_dim"], generator=g),  # b l d
    }


def _forward(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _randomize(transformer: torch.nn.Module, adapter_name: str, seed: int) -> None:
    """Nonzero A and B (peft starts B / lokr_w1 at zero, which would make every check pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(transformer, adapter_name):
            param.copy_(0.2 * torch.randn(param.shape, generator=g))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- filters ---------------------------------------------------------------------------------------


def test_default_selects_every_block_linear(tiny_model_dir: Path) -> None:
    selected = select_modules(_transformer(tiny_model_dir), _network())
    expected = {f"blocks.{i}.{suffix}" for i in range(NUM_LAYERS) for suffix in TARGET_SUFFIXES}
    assert len(selected) == NUM_LAYERS * 10
    assert set(selected) == expected


def test_filters_only_ignore_and_ai_toolkit_prefix(tiny_model_dir: Path) -> None:
    transformer = _transformer(tiny_model_dir)
    only_attn1 = select_modules(transformer, _filters(only=["attn1"], ignore=["to_q"]))
    assert only_attn1 == [
        f"blocks.{i}.attn1.{p}" for i in range(NUM_LAYERS) for p in ("to_k", "to_v", "to_out.0")
    ]
    block0 = select_modules(transformer, _filters(only=["transformer.blocks.0."]))
    assert block0 == [f"blocks.0.{suffix}" for suffix in TARGET_SUFFIXES]
    no_ffn = select_modules(transformer, _filters(ignore=["transformer.blocks.1.ffn"]))
    assert len(no_ffn) == NUM_LAYERS * 10 - 2 and not any(n.startswith("blocks.1.ffn") for n in no_ffn)


def test_ignore_wins_and_empty_selection_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"selects no module.*blocks\.1\..*blocks\.0\.attn1\.to_q"):
        select_modules(_transformer(tiny_model_dir), _filters(only=["blocks.1."], ignore=["blocks.1."]))


# --- adding and scaling ----------------------------------------------------------------------------


def test_add_lora_is_seeded_trains_only_adapters_and_spares_global_rng(tiny_model_dir: Path) -> None:
    a, b, c = (_transformer(tiny_model_dir) for _ in range(3))
    rng_before = torch.random.get_rng_state()
    params_a = add_lora(a, _network(), "default", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    params_b = add_lora(b, _network(), "default", seed=1)
    params_c = add_lora(c, _network(), "default", seed=2)
    assert len(params_a) == NUM_LAYERS * 10 * 2  # lora_A and lora_B per module
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(params_a, params_c, strict=True))
    trainable = {id(p) for p in a.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params_a}


def test_scale_matches_merged_weights(tiny_model_dir: Path) -> None:
    transformer = _transformer(tiny_model_dir)
    add_lora(transformer, _network(), "default", seed=0)
    _randomize(transformer, "default", seed=1)
    layer = transformer.get_submodule("blocks.0.ffn.net.0.proj")
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(2))
    for alpha in (ALPHA, 7.0):
        set_lora_scale(transformer, alpha, "default")
        assert lora_scale(transformer, "default") == alpha / RANK
        merged = weight + (alpha / RANK) * lora_b @ lora_a
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ merged.T + bias, rtol=0, atol=1e-6)


def test_lokr_scale_matches_merged_weights(tiny_model_dir: Path) -> None:
    transformer = _transformer(tiny_model_dir)
    add_lora(transformer, _network(type="lokr"), "default", seed=0)
    _randomize(transformer, "default", seed=1)
    layer = transformer.get_submodule("blocks.0.ffn.net.0.proj")  # 96 x 48: w2 low-rank at rank 4
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))
    for alpha in (ALPHA, 7.0):
        set_lora_scale(transformer, alpha, "default")
        w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
        merged = layer.base_layer.weight + (alpha / RANK) * torch.kron(layer.lokr_w1["default"], w2)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ merged.T + layer.base_layer.bias, rtol=0, atol=1e-6)


# --- export layout and parity with diffusers' loader -----------------------------------------------


def test_export_uses_wan_original_keys_and_alpha(tiny_model_dir: Path) -> None:
    transformer = _transformer(tiny_model_dir)
    add_lora(transformer, _network(), "default", seed=0)
    state = lora_state_dict_comfy(transformer, "default", ALPHA, torch.bfloat16)
    modules = [f"diffusion_model.blocks.{i}.{c}" for i in range(NUM_LAYERS) for c in COMFY_NAMES.values()]
    expected = {f"{m}.{s}" for m in modules for s in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert set(state) == expected
    assert "diffusion_model.blocks.1.ffn.0.lora_A.weight" in state  # from ffn.net.0.proj
    assert comfy_module_name("blocks.1.attn2.to_out.0") == "diffusion_model.blocks.1.cross_attn.o"
    assert state["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].shape == (RANK, 48)
    assert state["diffusion_model.blocks.0.ffn.0.lora_B.weight"].shape == (96, RANK)
    assert all(
        state[k].item() == ALPHA and state[k].dtype == torch.float32 for k in state if k.endswith("alpha")
    )
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k.endswith("weight"))
    with pytest.raises(AssertionError, match="set_lora_scale"):
        lora_state_dict_comfy(transformer, "default", 5.0, torch.float32)


def _diffusers_pipeline(model_dir: Path, high_file: Path, low_file: Path) -> WanImageToVideoPipeline:
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(high_file), adapter_name="high")
    pipe.load_lora_weights(str(low_file), adapter_name="low", load_into_transformer_2=True)
    return pipe


@pytest.mark.parametrize(
    "network",
    [
        _network(),
        _filters(only=["transformer.blocks.1.", "ffn"], ignore=["attn2.to_k", "blocks.0.ffn.net.2"]),
    ],
    ids=["all-modules", "filtered"],
)
def test_export_parity_with_diffusers_load_lora_weights(
    tiny_model_dir: Path, tmp_path: Path, network: NetworkConfig
) -> None:
    ours = _experts(tiny_model_dir)
    experts = {"high": ours.transformer_high, "low": ours.transformer_low}
    inputs = _inputs()
    base = {name: _forward(t, inputs) for name, t in experts.items()}
    for seed, (name, transformer) in enumerate(experts.items()):
        add_lora(transformer, network, name, seed=seed)
        _randomize(transformer, name, seed=10 + seed)
    for alpha in (ALPHA, 5.0):
        files = {}
        for name, transformer in experts.items():
            set_lora_scale(transformer, alpha, name)
            files[name] = save_lora(
                tmp_path / f"{name}_{alpha}.safetensors",
                transformer,
                name,
                alpha,
                dtype=torch.float32,
                metadata={"expert": name},
            )
        pipe = _diffusers_pipeline(tiny_model_dir, files["high"], files["low"])
        theirs = {"high": pipe.transformer, "low": pipe.transformer_2}
        for name, transformer in experts.items():
            expected = _forward(transformer, inputs)
            assert _max_diff(expected, base[name]) > 1e-2, "the LoRA must change the output"
            assert _max_diff(_forward(theirs[name], inputs), expected) <= FP32_TOL, (name, alpha)


# --- round trips -----------------------------------------------------------------------------------


def test_lora_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    trained = _transformer(tiny_model_dir)
    add_lora(trained, _network(), "default", seed=0)
    _randomize(trained, "default", seed=1)
    set_lora_scale(trained, 5.0, "default")
    path = save_lora(
        tmp_path / "lora.safetensors", trained, "default", 5.0, dtype=torch.float32, metadata={"step": "7"}
    )
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"step": "7"}

    fresh = _transformer(tiny_model_dir)
    add_lora(fresh, _network(), "default", seed=3)  # other init: loading must overwrite it
    assert load_lora_into(fresh, path, "default") == 5.0
    assert lora_scale(fresh, "default") == 5.0 / RANK
    inputs = _inputs()
    assert _max_diff(_forward(fresh, inputs), _forward(trained, inputs)) == 0.0


def test_load_refuses_other_network_or_missing_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    trained = _transformer(tiny_model_dir)
    add_lora(trained, _filters(only=["blocks.0."]), "default", seed=0)
    path = save_lora(tmp_path / "b0.safetensors", trained, "default", ALPHA, dtype=torch.float32, metadata={})
    with pytest.raises(ValueError, match="no adapter 'default'"):
        load_lora_into(_transformer(tiny_model_dir), path, "default")
    everywhere = _transformer(tiny_model_dir)
    add_lora(everywhere, _network(), "default", seed=0)
    with pytest.raises(ValueError, match="missing keys"):
        load_lora_into(everywhere, path, "default")
    other_rank = _transformer(tiny_model_dir)
    add_lora(other_rank, _filters(only=["blocks.0."]).model_copy(update={"linear": 8}), "default", seed=0)
    with pytest.raises(ValueError, match="another rank"):
        load_lora_into(other_rank, path, "default")


def _comfy_lokr_delta(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ComfyUI's / LyCORIS's LoKr rule: alpha / rank when a factor is low-rank, else 1.0."""
    w1, w2, rank = state.get(f"{module}.lokr_w1"), state.get(f"{module}.lokr_w2"), None
    if w1 is None:
        w1, rank = (
            state[f"{module}.lokr_w1_a"] @ state[f"{module}.lokr_w1_b"],
            state[f"{module}.lokr_w1_b"].shape[0],
        )
    if w2 is None:
        w2, rank = (
            state[f"{module}.lokr_w2_a"] @ state[f"{module}.lokr_w2_b"],
            state[f"{module}.lokr_w2_b"].shape[0],
        )
    scale = state[f"{module}.alpha"].item() / rank if rank is not None else 1.0
    return torch.kron(w1, w2) * scale


# Tiny widths 48 / 96: auto factors (6, 8) / (8, 12) keep w2 whole in attention at rank 4 but not in
# the FFN; factor 4 gives (4, 12) / (4, 24), low-rank everywhere unless full rank.
@pytest.mark.parametrize(
    ("lokr_factor", "full_rank", "whole_w2", "low_rank_w2"),
    [(-1, False, True, True), (4, False, False, True), (4, True, True, False)],
    ids=["auto-factor", "factor4", "factor4-full-rank"],
)
def test_lokr_round_trip_and_comfy_scale(
    tiny_model_dir: Path, tmp_path: Path, lokr_factor: int, full_rank: bool, whole_w2: bool, low_rank_w2: bool
) -> None:
    network = _network(type="lokr", lokr_factor=lokr_factor, lokr_full_rank=full_rank)
    trained = _transformer(tiny_model_dir)
    add_lora(trained, network, "default", seed=0)
    _randomize(trained, "default", seed=1)
    set_lora_scale(trained, 5.0, "default")
    assert lora_scale(trained, "default") == 5.0 / RANK  # full rank too: linear is the nominal rank
    path = save_lora(tmp_path / "lokr.safetensors", trained, "default", 5.0, dtype=torch.float32, metadata={})

    state = load_file(str(path))
    assert "diffusion_model.blocks.0.self_attn.q.lokr_w1" in state
    assert any(k.endswith(".lokr_w2") for k in state) == whole_w2  # there the scale is baked into w1
    assert any(k.endswith(".lokr_w2_a") for k in state) == low_rank_w2
    for name in select_modules(trained, network):
        layer = trained.get_submodule(name)
        torch.testing.assert_close(
            _comfy_lokr_delta(state, comfy_module_name(name)),
            layer.get_delta_weight("default").detach(),
            rtol=0,
            atol=1e-6,
        )

    # Whole-factor modules are applied at scale 1, their scale baked into lokr_w1: their `.alpha` is
    # the rank (alpha / rank = 1, as LyCORIS writes it), so no reader applies the scale twice.
    for name in select_modules(trained, network):
        module = comfy_module_name(name)
        whole = f"{module}.lokr_w2" in state
        assert state[f"{module}.alpha"].item() == (RANK if whole else 5.0), module
    assert exported_alpha(trained, "default", 5.0) == (RANK if full_rank else 5.0)

    fresh = _transformer(tiny_model_dir)
    add_lora(fresh, network, "default", seed=3)
    assert load_lora_into(fresh, path, "default") == (RANK if full_rank else 5.0)
    inputs = _inputs()
    assert _max_diff(_forward(fresh, inputs), _forward(trained, inputs)) <= 1e-6
