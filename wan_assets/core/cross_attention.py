"""Text cross-attention with the video tokens split into a batch of chunks (DESIGN 10, speed).

Each Wan block attends from every video token (9,216 to 32,760 of them) to the 512 text tokens. The
fused attention kernels parallelize their backward pass over blocks of keys: 512 keys are a few
blocks per head, so the whole GPU works through 32,760 queries with a few hundred thread blocks
(cuDNN's backward ran at about a tenth of its self-attention rate on an H100). Queries do not
interact in attention, so the video tokens are cut into equal chunks laid along the batch axis, each
with the same keys and values (gradients to them are summed over chunks): the same result, with
the backward's parallelism multiplied by the chunk count.

Installed on each block's cross-attention by `perf.apply_training_options` when the block uses
diffusers' native (PyTorch SDPA) backend; any other call (a mask, image context, another backend)
goes to diffusers' processor unchanged.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

CHUNKS = (8, 4, 2)  # tried in order: the first that divides the tokens and keeps chunks long
NATIVE_BACKENDS = (None, "native")


def chunk_count(queries: int, keys: int) -> int:
    """How many chunks to cut `queries` into: each at least 4x the keys, else no chunking (1)."""
    return next((c for c in CHUNKS if queries % c == 0 and queries // c >= 4 * keys), 1)


class ChunkedCrossAttention:
    """A WanAttnProcessor for cross-attention whose query tokens go to SDPA as a batch of chunks."""

    def __init__(self, original: WanAttnProcessor) -> None:
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        plain = encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None
        if plain or attn.add_k_proj is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        batch, tokens, _ = query.shape
        chunks = chunk_count(tokens, key.shape[1])
        # [b, n, h*d] -> [b*c, h, n/c, d]; keys and values repeated per chunk, in the same order.
        q = query.reshape(batch * chunks, tokens // chunks, attn.heads, -1).transpose(1, 2)
        k, v = (
            x.unflatten(2, (attn.heads, -1)).repeat_interleave(chunks, 0).transpose(1, 2)
            for x in (key, value)
        )
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def install(transformer: torch.nn.Module) -> int:
    """Chunk the text cross-attention of every block on the native backend; returns how many."""
    count = 0
    for block in getattr(transformer, "blocks", ()):
        attn = getattr(block, "attn2", None)
        processor = getattr(attn, "processor", None)
        if type(processor) is WanAttnProcessor and processor._attention_backend in NATIVE_BACKENDS:
            attn.processor = ChunkedCrossAttention(processor)
            count += 1
    return count


def remove(transformer: torch.nn.Module) -> None:
    for block in getattr(transformer, "blocks", ()):
        attn = getattr(block, "attn2", None)
        if isinstance(getattr(attn, "processor", None), ChunkedCrossAttention):
            attn.processor = attn.processor.original
