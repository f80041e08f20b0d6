"""Speed and memory options (docs/architecture.md §10) on CPU: each one gives the plain path's loss and gradients, or
fails with one clear message when this device cannot run it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.testing import CompileCounterWithBackend

from wan_assets.core.config import ModelConfig, NetworkConfig, TrainConfig, parse_config
from wan_assets.core.model import lora_gemm, quantize
from wan_assets.core.model.lora import (
    TRAINED_ADAPTER,
    FusedLoraLinear,
    add_lora,
    fuse_lora_linears,
    set_lora_scale,
)
from wan_assets.core.model.quantize import Float8FrozenLinear
from wan_assets.core.model.tiny import TINY_TRANSFORMER
from wan_assets.core.speed import block_parts, memory_plan, offload
from wan_assets.core.speed import options as speed_options
from wan_assets.core.speed.memory_plan import GIB, MatmulPlanner, PlanStore
from wan_assets.core.train.loop import train
from wan_assets.core.train.metrics_log import read_lines

from .conftest import tiny_job_raw

CPU = torch.device("cpu")
MODEL = ModelConfig(name_or_path="tiny")


@pytest.fixture(scope="module")
def expert() -> WanTransformer3DModel:
    """The tiny expert with a LoRA whose B is not zero, so the adapter shapes the loss."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 3}).eval()
    model.requires_grad_(False)
    params = add_lora(model, NetworkConfig(linear=4, linear_alpha=4), "high_noise", seed=1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    return model


def inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(1, 36, 3, 8, 8, generator=g).to(dtype),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 16, TINY_TRANSFORMER["text_dim"], generator=g).to(dtype),
    }


def run(
    expert: WanTransformer3DModel,
    dtype: torch.dtype = torch.float32,
    model_cfg: ModelConfig = MODEL,
    setup: bool = True,
    **options,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and LoRA gradients of one forward/backward of a copy of `expert` with `options`."""
    model = copy.deepcopy(expert).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if setup:
        speed_options.apply_training_options(model, TrainConfig(**options), model_cfg, CPU)
    model.train()
    batch = inputs(dtype)
    target = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        pred = model(**batch, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def assert_same(a: tuple, b: tuple, *, exact: bool = True) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    check = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    assert check(loss_a, loss_b), (loss_a, loss_b)
    assert all(g.abs().sum() > 0 for g in grads_a), "every LoRA weight should get a gradient"
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert check(ga, gb), (ga - gb).abs().max()


def test_checkpointing_modes_match_the_plain_path(expert: WanTransformer3DModel) -> None:
    plain = run(expert, gradient_checkpointing=False)
    assert_same(run(expert, gradient_checkpointing=True), plain)
    assert_same(run(expert, gradient_checkpointing="selective"), plain)
    assert_same(run(expert, gradient_checkpointing=True, activation_offload=True), plain)


def test_selective_policy_keeps_self_attention_only() -> None:
    q = torch.zeros(1, 2, 48, 8)
    keep, redo = (
        torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE,
        torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE,
    )
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert speed_options._save_attention(None, sdpa, q, q, q) == keep
    assert (
        speed_options._save_attention(None, sdpa, q, torch.zeros(1, 2, 16, 8), q) == redo
    )  # cross-attention
    assert speed_options._save_attention(None, torch.ops.aten.mm.default, q, q) == redo
    assert speed_options._save_attention_and_matmuls(None, torch.ops.aten.mm.default, q, q) == keep
    assert speed_options._save_attention_and_matmuls(None, sdpa, q, torch.zeros(1, 2, 16, 8), q) == keep
    assert speed_options._save_attention_and_matmuls(None, torch.ops.aten.mul.Tensor, q, q) == redo


def test_compiled_blocks_match_eager(expert: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # aot_eager: dynamo capture, checkpoint HOP and AOT partitioning as inductor sees them, no codegen.
    monkeypatch.setattr(speed_options, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain = run(expert, gradient_checkpointing=False)
    assert_same(run(expert, gradient_checkpointing="selective", compile=True), plain, exact=False)
    torch._dynamo.reset()


def test_one_compiled_graph_per_policy_serves_every_bucket_shape(
    expert: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token dimension compiles dynamic: new bucket shapes (and sampling's) reuse the graphs of
    the first; only each checkpoint policy and the no-grad forward get a graph of their own."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(speed_options, "COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    model = copy.deepcopy(expert)
    speed_options.apply_training_options(
        model, TrainConfig(gradient_checkpointing="selective", compile=True), MODEL, CPU
    )
    model.train()

    def forward(frames: int, height: int, width: int) -> torch.Tensor:
        batch = inputs()
        batch["hidden_states"] = torch.randn(1, 36, frames, height, width)
        return model(**batch, return_dict=False)[0]

    for shape in [(3, 8, 8), (3, 8, 12), (5, 6, 10), (2, 12, 8)]:
        forward(*shape).square().mean().backward()
    assert counter.frame_count == 1, "four bucket shapes, one graph"
    model.blocks[0].wan_policy = "matmuls"  # what the memory planner sets on a GPU
    for shape in [(3, 8, 8), (4, 10, 6)]:
        forward(*shape).square().mean().backward()
    assert counter.frame_count == 2, "the second policy: one more graph for every shape"
    with torch.no_grad():
        forward(3, 6, 6), forward(5, 8, 10)
    assert counter.frame_count == 3, "sampling: one no-grad graph for every shape"
    torch._dynamo.reset()


def test_both_experts_and_every_alpha_share_the_compiled_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts' adapters have one name and the LoRA scale is a graph input: the second expert and
    an alpha phase change reuse the first expert's graph (each compiled its own before), with the
    scale in force in each expert's output."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(speed_options, "COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    experts = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 2}).eval()
        model.requires_grad_(False)
        for p in add_lora(model, NetworkConfig(linear=4, linear_alpha=4), TRAINED_ADAPTER, seed=seed):
            torch.nn.init.normal_(p, 0, 0.05)  # B != 0, so that the scale shows in the output
        speed_options.apply_training_options(
            model, TrainConfig(gradient_checkpointing="selective", compile=True), MODEL, CPU
        )
        experts.append(model.train())

    def loss(model: WanTransformer3DModel) -> torch.Tensor:
        out = model(**inputs(), return_dict=False)[0].square().mean()
        out.backward()
        return out.detach()

    first = [loss(m) for m in experts]
    assert counter.frame_count == 1, "the second expert reuses the first expert's graph"
    set_lora_scale(experts[0], 8.0, TRAINED_ADAPTER)
    changed = loss(experts[0])
    assert counter.frame_count == 1, "a new alpha reuses the graph"
    assert not torch.equal(changed, first[0]), "the new scale is in force inside the compiled graph"
    eager = copy.deepcopy(experts[0])
    speed_options.clear_training_options(eager)
    assert torch.allclose(loss(eager), changed, rtol=1e-5), "compiled with the new scale == eager"
    torch._dynamo.reset()


def test_compile_summary_names_graphs_cache_and_time(
    expert: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line `wan-assets train` ends with under compile: None before anything compiled, then the
    graph count, both caches' figures and where the time went."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    torch._dynamo.reset()
    counters.clear()
    compilation_time_metrics.clear()
    assert speed_options.compile_summary() is None
    monkeypatch.setattr(speed_options, "COMPILE_BACKEND", "aot_eager")
    run(expert, gradient_checkpointing="selective", compile=True)
    line = speed_options.compile_summary()
    assert line is not None and line.startswith("compile: 1 graphs; inductor cache "), line
    assert "AOTAutograd cache" in line and re.search(r"seconds: in all \d+\.\d", line), line
    # A torch whose timers have other names: the costliest of the ones it has, not nothing.
    compilation_time_metrics.clear()
    compilation_time_metrics.update({"some_new_timer": [100.0, 23.0], "build_guards": [0.5]})
    line = speed_options.compile_summary()
    assert line is not None and line.endswith("seconds: some_new_timer 123.0, build_guards 0.5"), line
    torch._dynamo.reset()


def test_compiled_offloaded_halves_match_eager(
    expert: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setattr(speed_options, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    plain = run(expert, gradient_checkpointing=False)
    offloaded = run(expert, gradient_checkpointing=True, activation_offload=True, compile=True)
    assert_same(offloaded, plain, exact=False)
    # The attention half's graph break at the taped attention splits it in two: 3 graphs per grad
    # mode (the forward without grad, the recompute with it), shared by every block.
    assert counters["stats"]["unique_graphs"] == 6, dict(counters["stats"])
    torch._dynamo.reset()


def test_block_halves_equal_the_block(expert: WanTransformer3DModel) -> None:
    block = copy.deepcopy(expert.blocks[0])
    g = torch.Generator().manual_seed(5)
    dim = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    hidden = torch.randn(1, 48, dim, generator=g)
    text = torch.randn(1, 16, dim, generator=g)
    temb = torch.randn(1, 6, dim, generator=g)
    rotary = expert.rope(inputs()["hidden_states"])
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            whole = block(hidden, text, temb, rotary)
            attention, feed_forward = block_parts.split(block)
            halves = feed_forward(attention(hidden, text, temb, rotary), text, temb, rotary)
        assert torch.equal(whole, halves), dtype
    trainable = {id(p) for p in block.parameters() if p.requires_grad}
    shares = [{id(p) for p in half.trainable()} for half in block_parts.split(block)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == trainable  # every LoRA weight belongs to exactly one half
    assert block_parts.split(torch.nn.Linear(2, 2)) is None  # not a Wan block: offloaded whole


def test_offload_keeps_half_inputs_and_self_attention_outputs(expert: WanTransformer3DModel) -> None:
    """Per block: the attention half's input, its self-attention output and log-sum-exp, the
    feed-forward half's input; in backward the self-attention op is not run again (its outputs come
    back from the tape), and loss and gradients stay the plain path's bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from wan_assets.core.speed.attention import ATTENTION_OPS, is_self_attention

    class CountSelfAttention(TorchDispatchMode):  # below the tape: sees only the ops that really run
        runs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ATTENTION_OPS and is_self_attention(args):
                CountSelfAttention.runs += 1
            return func(*args, **(kwargs or {}))

    model = copy.deepcopy(expert)
    speed_options.apply_training_options(
        model, TrainConfig(gradient_checkpointing=True, activation_offload=True), MODEL, CPU
    )
    model.train()
    stored = []
    original = offload.ActivationOffloader.store

    def recording(self, tensor, *, with_previous=False):
        stored.append((tuple(tensor.shape), with_previous))
        return original(self, tensor, with_previous=with_previous)

    with pytest.MonkeyPatch.context() as patch, CountSelfAttention():
        patch.setattr(offload.ActivationOffloader, "store", recording)
        model(**inputs(), return_dict=False)[0].sum().backward()
    tokens, dim = 48, TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    heads = TINY_TRANSFORMER["num_attention_heads"]
    per_block = [
        ((1, tokens, dim), False),  # the attention half's input starts its group
        ((1, heads, tokens, dim // heads), True),  # its attention output and log-sum-exp join it
        ((1, heads, tokens), True),
        ((1, tokens, dim), False),  # the feed-forward half's input
    ]
    assert stored == per_block * len(model.blocks)
    assert CountSelfAttention.runs == len(model.blocks), "self-attention ran again in the recompute"


def test_offload_bounds_the_copies_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host waits for the oldest device -> host copies once more than MAX_IN_FLIGHT bytes are
    pending (their memory is not reusable before), and never for the newest."""
    waited: list[int] = []

    class Copy:
        def __init__(self, n: int) -> None:
            self.n = n

        def synchronize(self) -> None:
            waited.append(self.n)

    monkeypatch.setattr(offload, "MAX_IN_FLIGHT", 100)
    offloader = offload.ActivationOffloader(CPU)
    for n in range(4):
        offloader._bound_in_flight(Copy(n), 40)  # type: ignore[arg-type]
    assert waited == [0, 1]  # 160 bytes pending after the 4th: wait for the oldest until 80 remain
    offloader._bound_in_flight(Copy(4), 500)  # type: ignore[arg-type]
    assert waited == [0, 1, 2, 3]  # one copy larger than the bound: only it stays pending


def test_offload_prefetches_only_the_next_half_back_input() -> None:
    """Slots as memory mode stores them (attention half: input, output, log-sum-exp; feed-forward
    half: input): loading a half's input starts only the previous half's input copying, never its
    taped outputs (at 480x832x81 under 24 GiB those two extra token x width tensors ran out of memory)."""
    offloader = offload.ActivationOffloader(CPU)
    x = torch.zeros(2)
    for _ in range(2):  # two blocks
        offloader.store(x)  # attention half's input
        offloader.store(x, with_previous=True)  # its attention output
        offloader.store(x, with_previous=True)  # and log-sum-exp
        offloader.store(x)  # feed-forward half's input
    assert [offloader.next_back(i) for i in range(8)] == [None, None, None, 0, 3, None, None, 4]
    offloader.begin()
    assert offloader.store(x, with_previous=True) == 0 and offloader.next_back(0) is None


def test_taped_forward_asks_for_the_log_sumexp() -> None:
    """Without grad, SDPA asks cuDNN / efficient attention for no log-sum-exp; the tape's replayed
    backward needs it, so the recording turns it on (flash and the CPU kernel always compute it)."""
    from wan_assets.core.speed.attention import with_log_sumexp

    aten, q = torch.ops.aten, torch.zeros(1)
    cudnn = (q, q, q, None, False, 0.0, False, False)
    args, _ = with_log_sumexp(aten._scaled_dot_product_cudnn_attention.default, cudnn, {})
    assert args[4] is True and args[5:] == cudnn[5:]
    _, kwargs = with_log_sumexp(
        aten._scaled_dot_product_efficient_attention.default, (q, q, q, None), {"compute_log_sumexp": False}
    )
    assert kwargs == {"compute_log_sumexp": True}
    cpu = (q, q, q, 0.0, False)
    assert with_log_sumexp(aten._scaled_dot_product_flash_attention_for_cpu.default, cpu, {}) == (cpu, {})


def test_attention_tape_never_changes_what_runs() -> None:
    """A replay without a record, or with the record of another op, runs the op itself."""
    from wan_assets.core.speed.attention import AttentionTape

    q = torch.randn(1, 2, 16, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    kept: list[torch.Tensor] = []
    tape = AttentionTape(keep=lambda t: kept.append(t.clone()) or len(kept) - 1)
    with tape:
        assert torch.equal(torch.nn.functional.scaled_dot_product_attention(q, q, q), expected)
    assert len(kept) == 2  # output and log-sum-exp
    kept[0].fill_(7.0)  # what comes back in the replay is what the tape kept
    with tape.replay(kept.__getitem__):
        assert (torch.nn.functional.scaled_dot_product_attention(q, q, q) == 7.0).all()
        assert torch.equal(
            torch.nn.functional.scaled_dot_product_attention(q, q, q), expected
        )  # no record left
    cross = torch.randn(1, 2, 4, 8)
    with AttentionTape(keep=kept.append) as untaped:
        torch.nn.functional.scaled_dot_product_attention(q, cross, cross)
    assert not untaped.taped, "text cross-attention is recomputed, not taped"


def test_fused_lora_gives_peft_loss_and_gradients(expert: WanTransformer3DModel) -> None:
    # setup=False: peft's own forward (fp32 up-cast of the input, B product, scaling, sum).
    assert_same(run(expert, gradient_checkpointing=False), run(expert, setup=False), exact=False)
    # bf16 autocast: the fused GEMM rounds the sum once instead of three times.
    loss, grads = run(expert, torch.bfloat16, gradient_checkpointing=False)
    peft_loss, peft_grads = run(expert, torch.bfloat16, setup=False)
    assert abs(loss - peft_loss) / peft_loss < 1e-3
    for g, ref in zip(grads, peft_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0) > 0.999


def test_fused_lora_linear_math_and_fallbacks() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["0"]), model)
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 16)
    expected = layer(x)  # peft's forward
    assert fuse_lora_linears(model) == 1 and isinstance(layer, FusedLoraLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    manual = layer.base_layer(x) + 0.5 * (x @ a.t() @ b.t())
    assert torch.allclose(layer(x), expected, atol=1e-6) and torch.allclose(layer(x), manual, atol=1e-6)
    layer.enable_adapters(False)  # disabled adapters: the base layer alone, as in peft
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapters(True)
    layer.merge()  # merged: the merged base alone
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.unmerge()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
    assert fused.dtype == torch.bfloat16 and (fused.float() - expected).abs().max() < 0.05


def test_lora_gemm_ops_pass_opcheck_and_match_autograd() -> None:
    # opcheck: schema, fake tensor (compile), AOT dispatch and the autograd registration.
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 16), torch.randn(8, 16), torch.randn(8)
    low, up = torch.randn(6, 4), torch.randn(8, 4)
    for bias in (b, None):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, low, up)]
        torch.library.opcheck(lora_gemm.linear_lora, (leaves[0], leaves[1], bias, leaves[2], leaves[3]))
        out = lora_gemm.linear_lora(leaves[0], leaves[1], bias, leaves[2], leaves[3])
        refs = [t.clone().requires_grad_(True) for t in (x, w, low, up)]
        ref = refs[0] @ refs[1].t() + (0 if bias is None else bias) + refs[2] @ refs[3].t()
        assert torch.allclose(out, ref, atol=1e-5)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        for got, want in zip(leaves, refs, strict=True):
            assert torch.allclose(got.grad, want.grad, atol=1e-4)
    # A frozen base weight (every LoRA run): the input is not kept for a weight gradient.
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        x_leaf = x.clone().requires_grad_(True)
        lora_gemm.linear_lora(x_leaf, w, b, low.clone().requires_grad_(True), up)
    assert x_leaf.data_ptr() not in saved and len(saved) == 3, saved  # weight, low, up
    # The fp8 op (CPU emulates torch._scaled_mm): forward only, Float8LoraMatmul gives its gradients.
    x_q, x_scale = quantize.quantize_rows(x)
    w_q, w_scale = quantize.quantize_rows(w)
    args = (x_q, w_q.t(), x_scale, w_scale.view(1, -1), b.bfloat16(), low.bfloat16(), up.bfloat16())
    # (test_schema compares inputs arithmetically, which CPU fp8 tensors do not support.)
    torch.library.opcheck(
        lora_gemm.scaled_mm_lora, args, test_utils=("test_faketensor", "test_aot_dispatch_dynamic")
    )
    emulated = (x_q.float() * x_scale) @ (w_q.float() * w_scale).t() + b
    got = lora_gemm.scaled_mm_lora(*args).float()
    assert torch.allclose(got, (emulated.bfloat16().float() + low @ up.t()), rtol=0.02, atol=0.05)


def test_fused_lora_writes_base_and_product_into_one_buffer() -> None:
    # The old addmm(base(x), low, up^T) copied base(x) into a new buffer (a device-to-device copy of
    # every linear's output on the GPU); the fused linear runs one op that writes the output once.
    torch.manual_seed(0)
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(16, 8))
    )
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    fuse_lora_linears(model)
    with Ops() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
    ops = [str(op) for op in seen.ops]
    assert "wan_assets.linear_lora.default" in ops and "aten.addmm.default" not in ops, ops
    assert fused.dtype == torch.bfloat16 and (fused.float() - expected).abs().max() < 0.05
    assert (
        speed_options._save_attention_and_matmuls(None, torch.ops.wan_assets.linear_lora.default, x)
        == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    ), "the matmuls policy keeps the fused output as it kept the addmm's"
    # An fp8 base: the same one op (CPU emulation), against the fp8 base plus the LoRA product.
    layer.base_layer = Float8FrozenLinear(layer.base_layer, keep_transposed=False)
    x_leaf = x.clone().requires_grad_(True)
    with Ops() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        fp8 = layer(x_leaf)
    assert "wan_assets.scaled_mm_lora.default" in [str(op) for op in seen.ops]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref_x = x.clone().requires_grad_(True)
    ref = layer.base_layer(ref_x).float() + 0.5 * (ref_x @ a.t() @ b.t())
    assert (fp8.float() - ref).norm() / ref.norm() < 0.02
    grad = torch.randn_like(ref)
    fp8.float().backward(grad)
    ref.backward(grad)
    assert (x_leaf.grad - ref_x.grad).norm() / ref_x.grad.norm() < 0.02
    assert b.grad is not None and a.grad is not None


@pytest.mark.parametrize("qtype", ["qint8", "qfloat8"])
def test_weight_only_base_trains_close_to_bf16(expert: WanTransformer3DModel, qtype: str) -> None:
    bf16_loss, bf16_grads = run(expert, torch.bfloat16, gradient_checkpointing=True)
    model_cfg = ModelConfig(name_or_path="tiny", quantize=True, qtype=qtype)
    loss, grads = run(expert, torch.bfloat16, model_cfg, gradient_checkpointing=True)
    assert abs(loss - bf16_loss) / bf16_loss < 0.02
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in bf16_grads]), dim=0
    )
    assert cos > 0.98


def test_float8_frozen_linear_math() -> None:
    # CPU has no fp8 matmul; the module emulates torch._scaled_mm there, so the math is checked here.
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).requires_grad_(False)
    fp8 = Float8FrozenLinear(linear, keep_transposed=False)
    x = torch.randn(5, 7, 64, requires_grad=True)
    y = fp8(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = linear(ref_x)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert (y.float() - ref).norm() / ref.norm() < 0.05
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    assert (x.grad - ref_x.grad).norm() / ref_x.grad.norm() < 0.05
    fp8_t = Float8FrozenLinear(linear, keep_transposed=True)
    x2 = x.detach().clone().requires_grad_(True)
    fp8_t(x2).backward(grad)
    assert torch.equal(x2.grad, x.grad), "the stored transpose and the per-call one must agree"
    assert not list(fp8.parameters()), "fp8 weights are frozen buffers, never trained"


@pytest.mark.parametrize(
    ("options", "model_cfg", "message"),
    [
        ({"fp8_compute": True}, MODEL, "train.fp8_compute needs an fp8-capable GPU (sm_89+); this is cpu"),
        (
            {"fp8_compute": True},
            ModelConfig(name_or_path="t", quantize=True, qtype="uint4"),
            "train.fp8_compute needs an fp8-capable GPU",
        ),
        ({}, ModelConfig(name_or_path="t", quantize=True, qtype="nf5"), "model.qtype 'nf5' is not supported"),
        (
            {"activation_offload": True, "gradient_checkpointing": False},
            MODEL,
            "set train.gradient_checkpointing: true",
        ),
    ],
)
def test_options_this_device_cannot_run_fail_clearly(
    expert: WanTransformer3DModel, options: dict, model_cfg: ModelConfig, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        speed_options.apply_training_options(copy.deepcopy(expert), TrainConfig(**options), model_cfg, CPU)


def test_compile_without_a_compiler_fails_clearly(
    expert: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(speed_options.shutil, "which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match=re.escape("train.compile on CPU needs a C++ compiler")):
        speed_options.apply_training_options(copy.deepcopy(expert), TrainConfig(compile=True), MODEL, CPU)


def test_training_step_with_options_logs_the_plain_losses(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    """The production step (build_parts -> apply_training_options -> train_step), selective."""

    def losses(name: str, **options) -> list[float]:
        raw = tiny_job_raw(clips_dir, tiny_model_dir, steps=2, switch_boundary_every=1, **options)
        process = raw["config"]["process"][0]
        process["training_folder"] = str(tmp_path / name)
        process["sample"] = None
        result = train(parse_config(raw, workdir=tiny_cache).job, tiny_cache / "cache")
        return [line["loss"] for line in read_lines(result.files.metrics)]

    # Both experts, one step each; the other modes match the plain path at the model level above.
    plain = losses("plain", gradient_checkpointing=False)
    assert losses("selective", gradient_checkpointing="selective") == plain


def test_memory_planner_measures_then_fills_memory_and_backs_off() -> None:
    """Step 1 keeps no matmuls, step 2 probes one block, then as many as fit; a step whose backward
    never finished (out of memory) halves the count for that token count; no probe without room."""
    blocks = [torch.nn.Module() for _ in range(40)]
    state = {"allocated": 30 * GIB, "peak": 30 * GIB}
    planner = MatmulPlanner(
        blocks, CPU, guess_per_token=GIB // 1000, memory=lambda: (state["allocated"], state["peak"], 80 * GIB)
    )

    def step(tokens: int, *, per_block: float, finish: bool = True) -> int:
        count = planner.before_forward(tokens)
        kept = 10 * GIB + count * per_block  # activations the forward keeps
        state["allocated"] += kept
        planner.after_forward()
        state["peak"] = state["allocated"] + 5 * GIB  # the backward's working memory
        state["allocated"] -= kept
        if finish:
            planner.backward_finished()
        return count

    assert step(1000, per_block=GIB) == 0
    assert step(1000, per_block=GIB) == 1
    # room = 80 - (2 + 3.2) margin - 30 allocated - 10 kept - 5 working = 29.8 GiB -> 29 blocks
    assert step(1000, per_block=GIB) == 29
    assert [b.wan_policy for b in blocks].count("matmuls") == 29
    assert step(1000, per_block=GIB, finish=False) == 29  # runs out of memory
    assert step(1000, per_block=GIB) == 14
    assert step(2000, per_block=GIB) == 0, "another bucket is measured on its own"
    # 30 GiB of tokens: 30 - 5.2 - 30 - 10 - 5 leaves no room for twice the guessed 30 GiB block.
    assert [step(30000, per_block=GIB) for _ in range(3)] == [0, 0, 0]


class _FakeMemory:
    """The allocator as the planner reads it, for a step whose forward keeps `10 + count` GiB."""

    def __init__(self, capacity_gib: int = 80) -> None:
        self.allocated, self.peak, self.capacity = 30 * GIB, 30 * GIB, capacity_gib * GIB

    def __call__(self) -> tuple[int, int, int]:
        return self.allocated, self.peak, self.capacity

    def step(self, planner: MatmulPlanner, tokens: int, *, finish: bool = True) -> int:
        count = planner.before_forward(tokens)
        kept = tokens * (10 * GIB + count * GIB) // 1000
        self.allocated += kept
        planner.after_forward()
        self.peak = self.allocated + 5 * GIB * tokens // 1000
        self.allocated -= kept
        if finish:
            planner.backward_finished()
        return count


def _planner(store: PlanStore | None, memory: _FakeMemory) -> MatmulPlanner:
    blocks = [torch.nn.Module() for _ in range(40)]
    return MatmulPlanner(blocks, CPU, guess_per_token=GIB // 1000, memory=memory, store=store)


def test_memory_planner_scales_a_new_token_count_from_a_measured_one() -> None:
    """A new token count starts from the measured one's figures per token (plus a tenth) instead of
    two probe steps, then plans on its own measurements."""
    memory = _FakeMemory()  # plain and per-block figures both grow with the tokens
    planner = _planner(None, memory)

    def step(tokens: int) -> int:
        return memory.step(planner, tokens)

    assert [step(1000) for _ in range(3)] == [0, 1, 29]
    # Scaled: kept 22, per block 2.2, working 11 GiB: (80 - 5.2 - 30 - 22 - 11) / 2.2 -> 5 blocks.
    assert step(2000) == 5
    # Measured: kept 20 + 5 x 2 = 30 GiB, of it 5 x 2.2 per block -> plain 19, working 10:
    # (80 - 5.2 - 30 - 19 - 10) / 2.2 -> 7 blocks.
    assert step(2000) == 7
    assert step(500) == 40, "a smaller count fits every block at once"


def test_memory_planner_keeps_every_block_at_once_where_even_a_bad_guess_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for twice the guess in every block, the first step keeps matmuls everywhere: no
    probe steps, and the other policy's graph is never needed. A larger count that no longer fits
    every block measures from scratch; an out-of-memory step splits the figures and plans within
    the halved count; a second process plans from the kept figures at once."""
    monkeypatch.setattr(memory_plan, "_SHARED", {})
    memory = _FakeMemory(capacity_gib=200)  # room 200 - (2 + 8) margin - 30 allocated = 160 GiB
    path = tmp_path / "plan.json"
    planner = _planner(PlanStore(path, "card | a"), memory)
    assert [memory.step(planner, 1000) for _ in range(3)] == [40, 40, 40]
    assert [b.wan_policy for b in planner.blocks] == ["matmuls"] * 40
    saved = json.loads(path.read_text())["card | a"]["1000"]
    assert (saved["kept_all"], saved["working"], saved["kept_plain"]) == (50 * GIB, 5 * GIB, None)
    # 3000 tokens, scaled: 1.1 x 3 x (50 + 5) = 181.5 GiB > 160, so it keeps none, probes one block,
    # then fills: plain 30, working 15, 3 GiB per block -> (160 - 30 - 15) / 3 -> 38 blocks.
    assert [memory.step(planner, 3000) for _ in range(3)] == [0, 1, 38]
    # 500 tokens scales from the split figures of 3000 (they are preferred): every block fits.
    assert memory.step(planner, 500) == 40

    monkeypatch.setattr(memory_plan, "_SHARED", {})  # a new process reads the file
    again = _planner(PlanStore(path, "card | a"), memory)
    assert memory.step(again, 1000) == 40, "planned from the file: still no probe"
    assert memory.step(again, 1000, finish=False) == 40  # out of memory
    # Limit 20: keeping none measures plain 10 GiB, so per block (50 - 10) / 40 = 1 GiB: 20 blocks.
    assert [memory.step(again, 1000) for _ in range(2)] == [0, 20]

    other_memory = _FakeMemory(capacity_gib=200)
    fresh = _planner(None, other_memory)
    assert other_memory.step(fresh, 1000) == 40
    # Scaled from every-block figures alone: 1.1 x 2 x (50 + 5) = 121 GiB fits; then measured as it ran.
    assert other_memory.step(fresh, 2000) == 40
    assert fresh.shapes[2000].kept_all == 100 * GIB and not fresh.shapes[2000].scaled


class _Allocator:
    """A CUDA caching allocator as the planner sees it in the training loop: the peak is reset at each
    step start, before the forward; a step whose peak passes the capacity runs out of memory."""

    def __init__(self, capacity: float) -> None:
        self.allocated, self.peak, self.capacity = 29 * GIB, 29 * GIB, int(capacity * GIB)

    def __call__(self) -> tuple[int, int, int]:
        return self.allocated, self.peak, self.capacity

    def alloc(self, gib: float) -> None:
        self.allocated += int(gib * GIB)
        self.peak = max(self.peak, self.allocated)

    def step(self, planner: MatmulPlanner, tokens: int) -> tuple[int, bool]:
        """One training step of an expert whose blocks keep, at 9216 tokens, 4 GiB without matmul
        outputs and 0.85 GiB per block that keeps them, and whose backward needs 3 GiB more (all in
        proportion to the tokens): the count planned and whether it fit."""
        self.peak = self.allocated  # torch.cuda.reset_peak_memory_stats at the step's start
        before = self.allocated
        count = planner.before_forward(tokens)
        scale = tokens / 9216
        self.alloc(scale * (4 + 0.85 * count))
        planner.after_forward()
        self.alloc(scale * 3)
        fits = self.peak <= self.capacity
        if fits:
            planner.backward_finished()
        self.allocated = before
        return count, fits


def test_memory_planner_never_plans_past_the_card_at_a_larger_token_count() -> None:
    """The bench's 480x832x81 after 512x512x33 (bench/README.md, issue 20): the backward's working
    memory is measured although the loop resets the peak before each forward, so the larger token
    count never runs out of memory, and settles at the most blocks that fit within the margin."""
    memory = _Allocator(capacity=139.5)
    planner = MatmulPlanner(
        [torch.nn.Module() for _ in range(40)], CPU, guess_per_token=2 * GIB // 9216, memory=memory
    )
    small = [memory.step(planner, 9216) for _ in range(5)]
    assert small == [(0, True), (1, True)] + [(40, True)] * 3
    large = [memory.step(planner, 32760) for _ in range(5)]
    assert all(fits for _, fits in large), large
    # Within the margin (2 GiB + 4% of the card): 29 + 3.55 x (4 + 0.85 n + 3) <= 139.5 - 7.58
    settled = large[-1][0]
    assert large[-2][0] == settled and 29 + 32760 / 9216 * (4 + 0.85 * (settled + 1) + 3) > 139.5 - 7.58
    assert settled >= 20, large


def test_memory_planner_plans_within_a_capped_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under set_per_process_memory_fraction the capacity is the cap, not the card's free memory."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (100 * GIB, 140 * GIB))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 30 * GIB)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 28 * GIB)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 29 * GIB)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    planner = MatmulPlanner([], torch.device("cuda"), guess_per_token=1)  # as the options pass it
    fraction = {"value": 1.0}

    def get_fraction(device) -> float:
        assert isinstance(device, int), "torch refuses a device without an index here"
        return fraction["value"]

    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", get_fraction)
    assert planner.memory() == (28 * GIB, 29 * GIB, 130 * GIB), "free plus what the allocator holds"
    fraction["value"] = 80 / 140
    assert planner.memory() == (28 * GIB, 29 * GIB, 80 * GIB), "an 80 GiB cap on a 140 GiB card"


def test_memory_plan_is_kept_for_the_next_run_and_the_other_expert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process with the same key plans its first step without probing; the other expert of
    the same process shares the first one's figures; another key (another card, rank, fp8, ...)
    measures afresh; an out-of-memory limit is kept too, where the memory is no larger than it was;
    an unreadable file only costs the probes."""
    path = tmp_path / "compile_cache" / "wan_assets_memory_plan.json"
    monkeypatch.setattr(memory_plan, "_SHARED", {})
    memory = _FakeMemory()
    high = _planner(PlanStore(path, "card | a"), memory)
    assert [memory.step(high, 1000) for _ in range(2)] == [0, 1]
    # Learned when the probe's backward finished, not at a next forward that may never come.
    assert json.loads(path.read_text())["card | a"]["1000"]["per_block"] == GIB
    assert memory.step(high, 1000) == 29
    low = _planner(PlanStore(path, "card | a"), memory)
    assert memory.step(low, 1000) == 29, "the other expert of the run: no probe of its own"
    assert memory_plan.plan_summary() == f"memory plan: 1 token counts measured, 0 of them read from {path}"

    monkeypatch.setattr(memory_plan, "_SHARED", {})  # a new process
    again = _planner(PlanStore(path, "card | a"), memory)
    assert memory.step(again, 1000) == 29, "planned from the file at its first step"
    assert memory.step(again, 2000) == 5, "a new token count scales from the file's figures"
    assert memory.step(again, 1000, finish=False) == 29  # out of memory
    assert memory.step(again, 1000) == 14
    assert memory_plan.plan_summary() == f"memory plan: 2 token counts measured, 1 of them read from {path}"
    other = _planner(PlanStore(path, "card | b"), memory)
    assert [memory.step(other, 1000) for _ in range(3)] == [0, 1, 29], "another key probes on its own"

    monkeypatch.setattr(memory_plan, "_SHARED", {})
    third = _planner(PlanStore(path, "card | a"), memory)
    assert memory.step(third, 1000) == 14, "the limit an out-of-memory step set is kept"
    monkeypatch.setattr(memory_plan, "_SHARED", {})
    larger = _FakeMemory(capacity_gib=139)  # the same card, no allocator cap: the limit was the cap's
    assert larger.step(_planner(PlanStore(path, "card | a"), larger), 1000) == 40
    assert set(json.loads(path.read_text())) == {"card | a", "card | b"}

    monkeypatch.setattr(memory_plan, "_SHARED", {})
    path.write_text(json.dumps({"card | a": {"1000": {"kept_plain": "10 GiB", "per_block": 1.0}}}))
    assert memory.step(_planner(PlanStore(path, "card | a"), memory), 1000) == 0, "figures of the wrong kind"
    monkeypatch.setattr(memory_plan, "_SHARED", {})
    path.write_text("{not json")
    fresh = _planner(PlanStore(path, "card | a"), memory)
    assert [memory.step(fresh, 1000) for _ in range(3)] == [0, 1, 29]
    assert set(json.loads(path.read_text())) == {"card | a"}, "rewritten whole"


def test_memory_plan_key_follows_what_the_figures_depend_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same model and options give the same key; LoRA rank, fp8 compute, the optimizer change it.
    The file lies in torch.compile's cache folder (the workdir's under `wan-assets train`)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile_cache"))
    assert speed_options._plan_path() == tmp_path / "compile_cache" / "wan_assets_memory_plan.json"
    train = TrainConfig(gradient_checkpointing="selective", compile=True)

    def key(rank: int = 4, **changes) -> str:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 2})
        model.requires_grad_(False)
        add_lora(model, NetworkConfig(linear=rank, linear_alpha=rank), TRAINED_ADAPTER, seed=1)
        return speed_options.plan_key(model, train.model_copy(update=changes), CPU)

    base = key()
    assert base == key() and base.startswith("cpu | ")
    assert len({base, key(rank=8), key(fp8_compute=True), key(optimizer="adamw")}) == 4


def test_offload_keeps_nothing_of_the_patch_embedding(
    expert: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under offload + compile the patch embedding's output is not made to ask for grad (it would be
    kept, and its gradient made, for the whole step: one token x width tensor twice on the GPU), and
    the first block still runs the graphs every other block runs: three blocks compile as many
    graphs as one."""
    import weakref

    def compiled_graphs(layers: int) -> int:
        counter = CompileCounterWithBackend("aot_eager")
        monkeypatch.setattr(speed_options, "COMPILE_BACKEND", counter)
        torch._dynamo.reset()
        model = copy.deepcopy(expert)
        model.blocks = model.blocks[:layers]
        train = TrainConfig(gradient_checkpointing=True, activation_offload=True, compile=True)
        speed_options.apply_training_options(model, train, MODEL, CPU)
        model.train()
        embedded = []
        model.patch_embedding.register_forward_hook(lambda m, a, out: embedded.append(weakref.ref(out)))
        out = model(**inputs(), return_dict=False)[0]
        assert embedded[0]() is None, "the patch embedding's output outlived the forward"
        out.sum().backward()
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad
        )
        torch._dynamo.reset()
        return counter.frame_count

    assert len(expert.blocks) == 3
    assert compiled_graphs(3) == compiled_graphs(1)
