"""Speed and memory options of the training step (docs/architecture.md §10), applied to an expert after its LoRA.

`apply_training_options` is the one entry point (`build_parts` calls it for every trained expert):
- LoRA: peft up-casts each adapted linear's input to the adapter's fp32 before the adapter runs;
  under autocast the adapter matmul casts it straight back to bf16, so the up-cast only costs a
  full-size copy per linear. It is switched off (bit-identical results under autocast). The
  adapter's up-projection adds into the base output inside one GEMM (lora.FusedLoraLinear).
- frozen base linears: fp8 compute (`train.fp8_compute`, Float8FrozenLinear; it pays under compile,
  where the quantization fuses) and/or weight-only storage (`model.quantize`: fp8 or int8 through
  torchao, uint4 through quantize.UInt4FrozenLinear), quantized block by block on the device.
- activations, per transformer block (`train.gradient_checkpointing`): false keeps all; true
  recomputes the whole block in backward; "selective" keeps the self-attention output (the
  costliest op to recompute, one token x dim tensor) and, under compile on a GPU, also the matmul
  and cross-attention outputs backward reads in as many blocks as memory allows (measured:
  memory_plan.py), recomputing the rest. `train.activation_offload` keeps the input of each block
  half (attention, feed-forward: block_parts.py) in pinned CPU memory (copied on a side stream) and
  recomputes the half from it in backward (offload.py).
- `train.compile`: each block compiled on its own (regional: one graph reused by all 40 blocks),
  the token dimension dynamic: one graph per checkpoint policy and one for sampling's no-grad
  forward serve every bucket shape (static shapes compiled again for each). Both experts share
  them (their adapters have one name, lora.TRAINED_ADAPTER, and the graphs guard on the names they
  index by), and an alpha phase change reuses them (the LoRA scale is a graph input,
  lora.FusedLoraLinear). The compiled artefacts persist in the workdir (cli.py), so a second run
  reuses them.
Options a device cannot run raise one ValueError naming the option and the device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import WanTransformer3DModel
from peft.tuners.lora.layer import LoraLayer
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from wan_assets.core.config import ModelConfig, TrainConfig, offloads_inactive_expert
from wan_assets.core.model import lora_gemm, quantize
from wan_assets.core.model.lora import fuse_lora_linears
from wan_assets.core.speed import block_parts
from wan_assets.core.speed.attention import ATTENTION_OPS, is_self_attention
from wan_assets.core.speed.memory_plan import PLAN_FORMAT, MatmulPlanner, PlanStore
from wan_assets.core.speed.offload import ActivationOffloader, offloaded_block

logger = logging.getLogger(__name__)
COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same graph capture, no code generation
RECOMPILE_LIMIT = 64  # checkpoint policies x grad modes (x alpha values for LoKr, whose scale is a constant)
# The token dimension compiles dynamic: one graph per checkpoint policy (and one for sampling's
# no-grad forward) serves every bucket shape, instead of a compile per shape (bench/README.md,
# warm-up). False: static shapes, a graph per token count (the benchmark compares the two).
DYNAMIC_TOKENS = True


@dataclass(frozen=True)
class AppliedOptions:
    """What `apply_training_options` did to one expert (for logs and the benchmark)."""

    checkpointing: str  # none | full | selective | offload
    compiled: bool
    fp8_linears: int
    weight_only: str | None  # fp8 | int8 when the base is stored quantized


def apply_training_options(
    transformer: WanTransformer3DModel, train: TrainConfig, model_cfg: ModelConfig, device: torch.device | str
) -> AppliedOptions:
    """Set up one expert (LoRA already added) for training on `device`; see the module docstring.

    The expert ends on `device`, or on the CPU when inactive experts are offloaded (`activate` in
    train/loop.py moves it in when its turn comes).
    """
    device = torch.device(device)
    kind = check_options(train, model_cfg, device)
    clear_training_options(transformer)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
    fuse_lora_linears(transformer)
    home = torch.device("cpu") if offloads_inactive_expert(train, model_cfg) else device
    fp8_linears = _place_and_quantize(transformer, train, kind, device, home)
    mode = _checkpoint_mode(train)
    offloader = ActivationOffloader(device) if mode == "offload" else None
    _install_checkpointing(transformer, mode, offloader)
    if train.compile:
        _compile_blocks(transformer, halves=mode == "offload")
    # Keeping matmul outputs too pays only under compile (eager would also keep the ones backward
    # never reads) and is measured with the CUDA allocator.
    planner = None
    if mode == "selective" and train.compile and device.type == "cuda":
        config = transformer.config
        dim = config.num_attention_heads * config.attention_head_dim
        # bf16 bytes of q, k, v, o, the cross-attention q and o, and the FFN hidden twice.
        guess = 2 * (6 * dim + 2 * config.ffn_dim)
        store = PlanStore(_plan_path(), plan_key(transformer, train, device))
        planner = MatmulPlanner(list(transformer.blocks), device, guess_per_token=guess, store=store)
    hook = functools.partial(_before_forward, offloader=offloader, planner=planner)
    hooks = [transformer.register_forward_pre_hook(hook, with_kwargs=True)]
    if planner is not None:
        hooks.append(transformer.register_forward_hook(functools.partial(_after_forward, planner=planner)))
    if train.compile and mode != "offload":  # offloaded halves see a grad-requiring input anyway (offload.py)
        first = functools.partial(_first_block_input_needs_grad, planner=planner)
        hooks.append(transformer.patch_embedding.register_forward_hook(first))
    transformer._wan_perf_hooks = hooks
    if train.fp8_compute and not train.compile:
        logger.warning(
            "train.fp8_compute without train.compile: the fp8 casts run as separate kernels and cost "
            "more than the fp8 matmuls save; turn compile on"
        )
    return AppliedOptions(mode, train.compile, fp8_linears, kind)


def plan_key(transformer: WanTransformer3DModel, train: TrainConfig, device: torch.device) -> str:
    """What the memory planner's figures depend on (memory_plan.PlanStore), as one digest: the card,
    torch and diffusers, the model's config, one block's parameters and buffers (shapes, dtypes, which
    train: LoRA rank and targets, fp8 copies), the checkpoint policies' code, the compile settings,
    the optimizer, batch size, attention backend and dropout."""
    block = transformer.blocks[0]
    tensors = [*block.named_parameters(), *block.named_buffers()]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    described = {
        "format": PLAN_FORMAT,
        "card": [card, total],
        "torch": torch.__version__,
        # Not diffusers' private entries (_name_or_path: the same model under another path matches).
        "config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "diffusers": diffusers.__version__,
        "blocks": len(transformer.blocks),
        "block": [[n, list(t.shape), str(t.dtype), t.requires_grad] for n, t in tensors],
        "policies": [_SAVE_ATTENTION.cache_hash, _SAVE_MATMULS.cache_hash],  # type: ignore[attr-defined]
        "compile": [COMPILE_BACKEND, DYNAMIC_TOKENS],
        "train": [train.optimizer, train.fp8_compute, train.batch_size, train.attention_backend],
        # LoRA dropout has no parameters of its own: what it keeps for backward is named here.
        "dropout": sorted({str(m) for m in block.modules() if isinstance(m, torch.nn.Dropout)}),
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return f"{card} | " + hashlib.sha256(text.encode()).hexdigest()[:24]


def _plan_path() -> Path:
    """Beside torch.compile's caches (the workdir's under `wan-assets train`): kept and cleared with them."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "wan_assets_memory_plan.json"


def clear_training_options(transformer: WanTransformer3DModel) -> None:
    """Undo checkpointing, compilation and hooks (quantization stays): a fresh start for options."""
    for hook in getattr(transformer, "_wan_perf_hooks", ()):
        hook.remove()
    transformer._wan_perf_hooks = []
    transformer.disable_gradient_checkpointing()
    transformer.wan_matmul_blocks = None
    for block in transformer.blocks:
        original = getattr(type(block), "_wan_original_class", None)
        if original is not None:
            block.__class__ = original
        block._compiled_call_impl = None
        block_parts.forget(block)


# --- checks ---------------------------------------------------------------------------------------------


def check_options(train: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> str | None:
    """The quantization kind ("fp8" / "int8" / "int4" / None), or one ValueError for what cannot run."""
    kind = quantize.parse_qtype(model_cfg.qtype) if model_cfg.quantize else None
    if train.fp8_compute:
        problem = quantize.fp8_problem(device)
        if problem is not None:
            raise ValueError(
                f"train.fp8_compute needs an fp8-capable GPU (sm_89+); {problem}. "
                "Set fp8_compute: false (model.quantize: true with qtype qint8 saves memory on any device)"
            )
        if kind not in (None, "fp8"):
            raise ValueError(
                f"train.fp8_compute runs the base linears from fp8 weights; model.qtype {model_cfg.qtype!r} "
                "stores them as " + kind + ". Use qtype qfloat8 with fp8_compute, or turn fp8_compute off"
            )
    if train.activation_offload and train.gradient_checkpointing is not True:
        raise ValueError(
            "train.activation_offload keeps each block half's input in CPU memory and recomputes the whole "
            f"half in backward; set train.gradient_checkpointing: true (it is {train.gradient_checkpointing!r})"
        )
    if train.compile and device.type == "cpu" and not _cxx_compiler():
        raise ValueError(
            "train.compile on CPU needs a C++ compiler (g++ or clang++) for torch.compile's inductor; "
            "install one or set compile: false"
        )
    return kind


def _cxx_compiler() -> str | None:
    return next((p for p in (os.environ.get("CXX"), "g++", "c++", "clang++") if p and shutil.which(p)), None)


# --- base linears ---------------------------------------------------------------------------------------


def _place_and_quantize(
    transformer: WanTransformer3DModel,
    train: TrainConfig,
    kind: str | None,
    device: torch.device,
    home: torch.device,
) -> int:
    """Quantize block by block on `device` (a 24 GiB card never holds a bf16 expert), end on `home`."""
    swapped = 0
    if train.fp8_compute or kind is not None:
        for block in transformer.blocks:
            block.to(device)
            if train.fp8_compute:
                # Weight-only fp8 plus fp8 compute: one e4m3 copy (memory mode); fp8 compute alone keeps
                # a transposed copy too (bf16's footprint, no transpose per backward).
                swapped += quantize.to_float8(block, keep_transposed=not kind)
            else:
                assert kind is not None, "the branch runs for fp8 compute or a weight-only kind"
                quantize.weight_only(block, kind)
            block.to(home)
    transformer.to(home)
    return swapped


# --- activations ----------------------------------------------------------------------------------------


def _checkpoint_mode(train: TrainConfig) -> str:
    if train.activation_offload:
        return "offload"
    return {True: "full", False: "none", "selective": "selective"}[train.gradient_checkpointing]


def _install_checkpointing(
    transformer: WanTransformer3DModel, mode: str, offloader: ActivationOffloader | None
) -> None:
    if mode == "offload":
        assert offloader is not None, "offload mode comes with its offloader"
        # diffusers hands each block and its inputs to this function while grad is on.
        transformer.enable_gradient_checkpointing(functools.partial(offloaded_block, offloader=offloader))
    elif mode in ("full", "selective"):
        # Checkpointing inside the block's own forward, so that torch.compile sees it and the
        # selective policy applies to the compiled ops.
        for block in transformer.blocks:
            # A class is hashable; mypy reads type(block) of a block typed Any as unhashable type[Any].
            block.__class__ = _checkpointed_class(type(block))  # type: ignore[arg-type]
            block.wan_policy = "attention" if mode == "selective" else "full"


class _CheckpointedBlock(torch.nn.Module):
    """Mixin placed before a block's class: the block checkpoints itself while grad is on."""

    wan_policy: str = "full"  # full | attention | matmuls (attention plus matmul outputs)

    def forward(self, *args, **kwargs):
        run = super().forward
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        if self.wan_policy == "full":
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        context = _SAVE_MATMULS if self.wan_policy == "matmuls" else _SAVE_ATTENTION
        return checkpoint(run, *args, use_reentrant=False, context_fn=context, **kwargs)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    if issubclass(cls, _CheckpointedBlock):
        return cls
    # A subclass keeps module names, state_dict keys and isinstance checks as they were.
    return type(cls.__name__, (_CheckpointedBlock, cls), {"_wan_original_class": cls})


MATMUL_OPS = frozenset(
    {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._scaled_mm.default}
    | lora_gemm.FUSED_OPS
)


def _save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Self-attention only (keys as long as queries): cross-attention over 512 text tokens is cheap.
    if op in ATTENTION_OPS and is_self_attention(args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention_and_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Under compile only what backward reads is kept: with the fused LoRA GEMM, one output per
    # linear (not the base's and the adapter's), the attention inputs and outputs.
    if op in MATMUL_OPS or op in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _policy_context(policy) -> functools.partial:
    """The checkpoint `context_fn` of a selective policy, with the `cache_hash` that AOTAutograd's
    cache asks of one (without it, every new process traces and partitions each graph again): the
    policy's code and the ops it names, so a changed policy never reuses a stale graph."""
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    ops = sorted(str(op) for op in ATTENTION_OPS | MATMUL_OPS)
    code = policy.__code__
    digest = hashlib.sha256(
        repr((policy.__qualname__, code.co_code, code.co_consts, code.co_names, ops)).encode()
    )
    context.cache_hash = digest.hexdigest()  # type: ignore[attr-defined]
    return context


_SAVE_ATTENTION = _policy_context(_save_attention)
_SAVE_MATMULS = _policy_context(_save_attention_and_matmuls)


def compile_summary() -> str | None:
    """One line on what torch.compile did in this process: graphs, its caches' hits, and where its time
    went (dynamo's own timers, where this torch has them), or None when nothing was compiled."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    graphs = counters["stats"]["unique_graphs"]
    if not graphs:
        return None
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    line = (
        f"compile: {graphs} graphs; inductor cache {inductor['fxgraph_cache_hit']} hits, "
        f"{inductor['fxgraph_cache_miss']} misses; AOTAutograd cache {aot['autograd_cache_hit']} hits, "
        f"{aot['autograd_cache_miss']} misses, {aot['autograd_cache_bypass']} bypassed"
    )
    timers = {
        "in all": "_compile.compile_inner",
        "tracing": "bytecode_tracing",
        "code generation": "GraphLowering.compile_to_module",
        "loading compiled code": "PyCodeCache.load_by_key_path",
        "guards": "build_guards",
        # Triton's autotuning: each kernel's candidate configs timed on the GPU at its first call.
        "autotuning": "CachingAutotuner.benchmark_all_configs",
    }
    spent = [
        f"{label} {sum(compilation_time_metrics[k]):.1f}"
        for label, k in timers.items()
        if k in compilation_time_metrics
    ]
    if timers["in all"] not in compilation_time_metrics:
        # Another torch names its timers otherwise: the costliest of those it has.
        costliest = sorted(compilation_time_metrics.items(), key=lambda kv: -sum(kv[1]))[:5]
        spent = [f"{k} {sum(v):.1f}" for k, v in costliest]
    return line + (f"; seconds: {', '.join(spent)}" if spent else "; no compile timers recorded")


def _before_forward(module, args, kwargs, *, offloader, planner):
    if offloader is not None:
        offloader.begin()
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if planner is not None and torch.is_grad_enabled() and hidden is not None:
        batch, _, frames, height, width = hidden.shape
        p_t, p_h, p_w = module.config.patch_size
        tokens = batch * (frames // p_t) * (height // p_h) * (width // p_w)
        module.wan_matmul_blocks = planner.before_forward(tokens)
    return None


def _after_forward(module, args, output, *, planner):
    if torch.is_grad_enabled():
        planner.after_forward()
    return None


def _first_block_input_needs_grad(module, args, output, *, planner):
    # The patch embedding is frozen, so block 0 would get an input without grad and a compiled graph
    # of its own; asking for that input's gradient (one block's input matmuls) saves the compile.
    # A hook here, outside the compiled blocks: dynamo cannot trace requires_grad_. The gradient
    # reaching this tensor also marks the end of a backward for the memory planner.
    if torch.is_grad_enabled() and output.is_leaf and not output.requires_grad:
        output.requires_grad_(True)
        if planner is not None:
            output.register_hook(lambda grad: planner.backward_finished())
    return None


# --- compilation ----------------------------------------------------------------------------------------


def _compile_blocks(transformer: WanTransformer3DModel, *, halves: bool) -> None:
    """Compile each block, or under activation offload each block's halves (what offload runs)."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
    for block in transformer.blocks:
        parts = block_parts.split(block) if halves else None
        for unit in parts or (block,):
            if DYNAMIC_TOKENS:
                compiled = torch.compile(unit._call_impl, backend=COMPILE_BACKEND, dynamic=None)
                # What nn.Module.compile sets, with the token dimension marked first (outside the graph).
                unit._compiled_call_impl = functools.partial(_call_with_dynamic_tokens, compiled)
            else:
                unit.compile(backend=COMPILE_BACKEND, dynamic=False)


def _call_with_dynamic_tokens(
    compiled, hidden_states, encoder_hidden_states, temb, rotary_emb, *args, **kwargs
):
    """Mark the token dimension of a block's inputs dynamic, then call its compiled graph.

    A block unit is called as (hidden [b, tokens, dim], text [b, 512, dim], temb [b, 6, dim] or
    [b, tokens, 6, dim], rotary (cos, sin) [1, tokens, 1, head_dim]); only the token count differs
    between buckets, so one graph per checkpoint policy serves every bucket and sampling's shape.
    """
    mark = torch._dynamo.maybe_mark_dynamic
    mark(hidden_states, 1)
    if temb.ndim == 4:
        mark(temb, 1)
    for freqs in rotary_emb if isinstance(rotary_emb, (tuple, list)) else (rotary_emb,):
        mark(freqs, 1)
    return compiled(hidden_states, encoder_hidden_states, temb, rotary_emb, *args, **kwargs)
