"""A Wan transformer block as two halves, for activation offload (docs/architecture.md §10, memory mode).

Offloading recomputes one unit at a time in backward, and the GPU peak is that unit's activations
plus its gradients. A whole Wan block holds self-attention, cross-attention and the feed-forward
(whose hidden is 2.7 times the model width, twice over: before and after the GELU); split in two, the
attention half and the feed-forward half are recomputed and differentiated one after the other, so
the peak is the larger half's rather than their sum, at no extra compute (one more input per block
goes to CPU memory). Measured on an H100 at 512x512x81 (bench/README.md): 26.3 GiB peak with whole
blocks, 23.6 GiB with halves, same s/step.

The halves mirror diffusers 0.42's `WanTransformerBlock.forward` line for line (and the attention
half its self-attention processor, attention.py, so that offload keeps the attention output instead of
recomputing it); `split` refuses any other block class, and a test checks that the halves in sequence
equal the block bit for bit.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from wan_assets.core.speed import attention


def _modulation(block: WanTransformerBlock, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """shift, scale, gate (self-attention), then c_shift, c_scale, c_gate (feed-forward)."""
    if temb.ndim == 4:  # batch, seq_len, 6, dim (Wan 2.2 TI2V)
        chunks = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        return tuple(c.squeeze(2) for c in chunks)
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)  # batch, 6, dim (A14B)


class _Half(torch.nn.Module):
    """One half of `block`; called like the block: (hidden, encoder_hidden_states, temb, rotary_emb)."""

    uses: tuple[str, ...] = ()  # the block's submodules this half runs

    def __init__(self, block: WanTransformerBlock) -> None:
        super().__init__()
        self.block = block

    def trainable(self) -> list[torch.nn.Parameter]:
        """The trainable parameters this half reads (the modulation table belongs to both)."""
        params = [p for name in self.uses for p in getattr(self.block, name).parameters() if p.requires_grad]
        table = self.block.scale_shift_table
        return params + ([table] if table.requires_grad else [])


class AttentionHalf(_Half):
    uses = ("norm1", "attn1", "norm2", "attn2")

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        b = self.block
        shift_msa, scale_msa, gate_msa, _, _, _ = _modulation(b, temb)
        norm_hidden_states = (b.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(
            hidden_states
        )
        if attention.mirrors(b.attn1):  # the same, with the attention op's outputs kept (attention.py)
            query, key, value = attention.query_key_value(b.attn1, norm_hidden_states, rotary_emb)
            dtype = query.dtype
            attn_output = attention.attend(b.attn1, query, key, value)
            del query, key, value  # not held through the rest of the half (nor across the graph break)
            attn_output = attention.project_out(b.attn1, attn_output, dtype)
        else:
            attn_output = b.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
        norm_hidden_states = b.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = b.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        return hidden_states + attn_output


class FeedForwardHalf(_Half):
    uses = ("norm3", "ffn")

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        b = self.block
        _, _, _, c_shift_msa, c_scale_msa, c_gate_msa = _modulation(b, temb)
        norm_hidden_states = (b.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = b.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def split(block: torch.nn.Module) -> tuple[AttentionHalf, FeedForwardHalf] | None:
    """The block's two halves (made once, kept on the block), or None for a block class not mirrored here."""
    original = getattr(type(block), "_wan_original_class", type(block))
    if original is not WanTransformerBlock:
        return None
    halves = block.__dict__.get("_wan_halves")  # in __dict__: not a submodule (no cycle, no state_dict keys)
    if halves is None:
        halves = (AttentionHalf(block), FeedForwardHalf(block))
        block.__dict__["_wan_halves"] = halves
    return halves


def forget(block: torch.nn.Module) -> None:
    """Drop the halves (and their compiled code) kept on `block`."""
    block.__dict__.pop("_wan_halves", None)
