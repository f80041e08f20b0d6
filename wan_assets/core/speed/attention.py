"""Self-attention of a Wan block under activation offload: its output kept, not recomputed (docs/architecture.md §10).

Activation offload (offload.py) recomputes each block half in backward from its input. In the
attention half the costliest op to recompute is self-attention's forward (at 512x512x81, about
16 ms of a block's 125 ms). Its outputs (the attention output and its log-sum-exp, one token x dim
and one token x heads tensor) go to pinned CPU memory beside the half's input instead; in backward
the recompute runs everything else and takes the attention op's outputs from there: the attention
op's own backward (cuDNN, flash, efficient, or the CPU kernel) then runs on the recomputed query,
key and value and the forward's output, exactly as if the forward had run again (same inputs, same
kernels, bit for bit).

How: `query_key_value`, `attend` and `project_out` mirror diffusers' `WanAttnProcessor` for a
block's self-attention, and `attend` runs outside any compiled graph (a graph break), under the tape
in force: an `AttentionTape` is a TorchDispatchMode that records the attention op's outputs in the
forward and hands them back in place of running the op in the recompute. Autograd sits above the
dispatch mode, so it records the attention op's backward node with the outputs handed back.
Attention that is not one aten op (flash-attn, a math fallback) is never taped: it is recomputed, as
before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, _get_qkv_projections
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


def _attention_ops() -> frozenset:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


# The aten ops scaled_dot_product_attention runs as (one per backend); query, key, value come first.
ATTENTION_OPS = _attention_ops()


def is_self_attention(args: tuple) -> bool:
    """Keys as long as queries ([b, heads, tokens, head_dim]): a block's self-attention, not text cross-attention."""
    return args[1].shape[-2] == args[0].shape[-2]


# --- the tape -------------------------------------------------------------------------------------------


@dataclass
class _Taped:
    op: object
    outputs: object  # the op's outputs with each activation replaced by what `keep` returned for it


def _is_activation(value: object) -> bool:
    # The output and its log-sum-exp ([b, heads, tokens(, head_dim)]); seeds, offsets, sequence
    # lengths and debug masks are bookkeeping, kept as they are.
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 3


class AttentionTape(TorchDispatchMode):
    """Records the attention ops' outputs (forward), or hands them back in their place (recompute).

    `keep(tensor) -> handle` takes each activation output when recording (offload.py: into pinned
    CPU memory); `give(handle) -> tensor`, passed to `replay`, returns it when replaying. A replayed
    op whose record is missing or names another op runs, so the tape never changes what the block
    computes.
    """

    def __init__(self, keep: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.keep = keep
        self.give: Callable[[object], torch.Tensor] | None = None
        self.taped: list[_Taped] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ATTENTION_OPS or not is_self_attention(args):
            return func(*args, **kwargs)
        if self.give is not None:  # replaying
            if self.taped and self.taped[0].op is func:
                give = self.give
                return tree_map(
                    lambda v: give(v.handle) if isinstance(v, _Handle) else v, self.taped.pop(0).outputs
                )
            return func(*args, **kwargs)
        args, kwargs = with_log_sumexp(func, args, kwargs)
        outputs = func(*args, **kwargs)
        self.taped.append(
            _Taped(func, tree_map(lambda v: _Handle(self.keep(v)) if _is_activation(v) else v, outputs))
        )
        return outputs

    def replay(self, give: Callable[[object], torch.Tensor]) -> AttentionTape:
        """The same records, handed back through `give` from now on (the recompute in backward)."""
        self.give = give
        return self

    def handles(self) -> Iterator[object]:
        """What `keep` returned, in recording order."""
        for taped in self.taped:
            for value in _leaves(taped.outputs):
                if isinstance(value, _Handle):
                    yield value.handle


def with_log_sumexp(func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args`, `kwargs` with `compute_log_sumexp` on, for the ops that take it (cuDNN, efficient).

    The forward runs without grad, so scaled_dot_product_attention asks these kernels for no
    log-sum-exp; the replayed backward needs it (an uncomputed one gave non-finite gradients on an
    H100). flash and the CPU kernel always compute it.
    """
    names = [a.name for a in func._schema.arguments]
    if "compute_log_sumexp" not in names:
        return args, kwargs
    index = names.index("compute_log_sumexp")
    if index < len(args):
        return (*args[:index], True, *args[index + 1 :]), kwargs
    return args, {**kwargs, "compute_log_sumexp": True}


@dataclass(frozen=True)
class _Handle:
    handle: object


def _leaves(outputs: object) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


_TAPE: AttentionTape | None = None  # the tape in force (set by offload.py around a block half)


@contextmanager
def taping(tape: AttentionTape | None) -> Iterator[None]:
    """Put `tape` in force for the self-attention calls made inside."""
    global _TAPE
    outer, _TAPE = _TAPE, tape
    try:
        yield
    finally:
        _TAPE = outer


# --- the mirrored self-attention --------------------------------------------------------------------------


def mirrors(attn: torch.nn.Module) -> bool:
    """Whether the three parts below compute what `attn` does (diffusers' own processor, no image keys)."""
    return (
        type(getattr(attn, "processor", None)) is WanAttnProcessor and getattr(attn, "add_k_proj", 0) is None
    )


# `query_key_value`, `attend`, `project_out` in sequence are `attn(hidden_states, None, None,
# rotary_emb)` for a block's self-attention (`mirrors(attn)`), line for line as diffusers 0.42's
# WanAttnProcessor. The caller (block_parts.AttentionHalf) calls the three from its own forward, so
# that the graph break at `attend` splits that one frame in two graphs (a break inside a helper
# would split the helper's frame too: four graphs).


def query_key_value(attn: WanAttention, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """Projections, q/k norms and rotary embedding: query, key, value [b, tokens, heads, head_dim]."""
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _apply_rotary_emb(query, *rotary_emb)
        key = _apply_rotary_emb(key, *rotary_emb)
    return query, key, value


@torch._dynamo.disable  # runs eagerly between two compiled graphs, so that the tape sees the op
def attend(attn: WanAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The attention itself [b, tokens, heads, head_dim], under the tape in force."""
    processor = attn.processor

    def run() -> torch.Tensor:
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=processor._attention_backend,
            parallel_config=processor._parallel_config,
        )
        torch._dynamo.maybe_mark_dynamic(out, 1)  # the token count: the graph after it serves every bucket
        return out

    if _TAPE is None:
        return run()
    with _TAPE:
        return run()


def project_out(attn: WanAttention, hidden_states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Heads merged, in the query's dtype, through the output projection (the dtype, not the query:
    a tensor named across the graph break would stay alive through the rest of the half)."""
    hidden_states = hidden_states.flatten(2, 3)
    hidden_states = hidden_states.to(dtype)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)


def _apply_rotary_emb(
    hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)
