"""How many blocks keep their matmul outputs under selective checkpointing, measured, per bucket.

Selective checkpointing always keeps each block's self-attention output. A block may also keep the
matmul outputs its backward reads (then only pointwise ops are recomputed), which costs memory in
proportion to the tokens. How much, and how much the backward needs on top, depends on the
compiler's choices, so it is measured rather than guessed, separately for each token count:
  step 1  no block keeps matmuls: activations kept after the forward, and the step's peak;
  step 2  one block keeps them, if twice a generous guess of its cost fits: its extra bytes;
  then    as many blocks as fit under the device's memory with a margin.
Once one token count is measured, a new one is not probed again: what it keeps and needs grows with
its tokens, so its first step runs the measured figures scaled to its tokens (per token, the largest
any measured count showed, plus a tenth), and its own measurements replace the scaled ones from then
on (the bucket's first step is then as fast as its last, not two slower probes).
A step that does not finish its backward (out of memory: the training step skips the batch) halves
the count for that token count from then on. Numbers come from the CUDA caching allocator; the
training loop resets the peak at each step start (a peak never reset only makes the plan smaller).
The capacity planned for is the card's memory, or less where the process's allocator is capped
(`torch.cuda.set_per_process_memory_fraction`: a smaller card's budget on a larger one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

GIB = 2**30
SCALED_SAFETY = 1.1  # on per-token figures carried over from another token count


@dataclass
class _Shape:
    """What is known about one token count."""

    kept_plain: int | None = None  # bytes kept by a forward where no block keeps matmuls
    per_block: float | None = None  # extra bytes per block that keeps matmuls
    working: int = 0  # peak minus what the forward kept (the backward's working memory)
    limit: int | None = None  # most blocks allowed, after a step that ran out of memory
    scaled: bool = False  # the figures above are another token count's, scaled (not yet measured here)


def _memory_fraction(device: torch.device) -> float:
    """The allocator's per-process cap as a fraction of the card (1.0: none)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch 2.8+
    if get is None:
        return 1.0
    # It takes an index (a plain torch.device("cuda") is refused), unlike the allocator queries.
    return float(get(device.index if device.index is not None else torch.cuda.current_device()))


class MatmulPlanner:
    def __init__(
        self,
        blocks: list[WanTransformerBlock],
        device: torch.device,
        *,
        guess_per_token: int,
        memory: Callable[[], tuple[int, int, int]] | None = None,
    ) -> None:
        """`guess_per_token`: a generous guess of the bytes per token one block adds by keeping its
        matmul outputs (only to decide whether a probe is safe); `memory()` -> (allocated, peak
        allocated, capacity), the CUDA allocator's by default."""
        self.blocks = blocks
        self.device = device
        self.guess_per_token = guess_per_token
        self.memory = memory or self._cuda_memory
        self.shapes: dict[int, _Shape] = {}
        self._step: tuple[_Shape, int, int] | None = None  # shape, count, allocated before forward
        self._after: int | None = None  # allocated after that forward
        self._finished = True

    def _cuda_memory(self) -> tuple[int, int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        capacity = free + torch.cuda.memory_reserved(self.device)
        # Under a per-process cap the allocator fails at the cap however much the card has free.
        fraction = _memory_fraction(self.device)
        capacity = min(capacity, int(fraction * total))
        return (
            torch.cuda.memory_allocated(self.device),
            torch.cuda.max_memory_allocated(self.device),
            capacity,
        )

    def before_forward(self, tokens: int) -> int:
        """Learn from the last step, choose this step's count, set the blocks' policies; the count."""
        allocated, peak, capacity = self.memory()
        self._learn(peak)
        shape = self.shapes.setdefault(tokens, _Shape())
        count = self._choose(shape, tokens, allocated, capacity)
        for i, block in enumerate(self.blocks):
            block.wan_policy = "matmuls" if i < count else "attention"
        self._step, self._after, self._finished = (shape, count, allocated), None, False
        return count

    def after_forward(self) -> None:
        self._after = self.memory()[0]

    def backward_finished(self) -> None:
        self._finished = True

    def _learn(self, peak: int) -> None:
        if self._step is None:
            return
        shape, count, before = self._step
        if not self._finished or self._after is None:
            if count > 0:  # out of memory (or a skipped step): never try this many again
                shape.limit = count // 2
            return
        kept = self._after - before
        working = peak - self._after
        if shape.scaled:
            # The first step of this token count ran on scaled figures: what it kept and needed is
            # measured now; the split between plain and per-block keeps the scaled per-block figure.
            shape.scaled, shape.working = False, working
            assert shape.per_block is not None, "a scaled shape carries a per-block figure"
            shape.kept_plain = max(kept - int(count * shape.per_block), 0)
            return
        shape.working = max(shape.working, working)
        if count == 0:
            shape.kept_plain = kept
        elif shape.kept_plain is not None:
            shape.per_block = max(kept - shape.kept_plain, 1) / count

    def _choose(self, shape: _Shape, tokens: int, allocated: int, capacity: int) -> int:
        limit = len(self.blocks) if shape.limit is None else shape.limit
        if shape.kept_plain is None:
            self._scale_from_measured(shape, tokens)
        if shape.kept_plain is None or limit == 0:
            return 0
        margin = 2 * GIB + capacity // 25  # fragmentation and what the measurement missed
        room = capacity - margin - allocated - shape.kept_plain - shape.working
        if shape.per_block is None:  # probe one block, and only where even a bad guess fits
            return 1 if room > 2 * self.guess_per_token * tokens else 0
        return max(0, min(limit, int(room // shape.per_block)))

    def _scale_from_measured(self, shape: _Shape, tokens: int) -> None:
        """Fill a new token count's figures from the measured ones, per token (the largest, plus a tenth)."""
        measured = {
            t: m
            for t, m in self.shapes.items()
            if m.kept_plain is not None and m.per_block is not None and not m.scaled and m.limit is None
        }
        if not measured:
            return

        def scaled(value: Callable[[_Shape], float]) -> float:
            return SCALED_SAFETY * tokens * max(value(m) / t for t, m in measured.items())

        shape.kept_plain = int(scaled(lambda m: m.kept_plain or 0))
        shape.per_block = scaled(lambda m: m.per_block or 0.0)
        shape.working = int(scaled(lambda m: m.working))
        shape.scaled = True
