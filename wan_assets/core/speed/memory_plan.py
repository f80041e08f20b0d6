"""How many blocks keep their matmul outputs under selective checkpointing, measured, per bucket.

Selective checkpointing always keeps each block's self-attention output. A block may also keep the
matmul outputs its backward reads (then only pointwise ops are recomputed), which costs memory in
proportion to the tokens. How much, and how much the backward needs on top, depends on the
compiler's choices, so it is measured rather than guessed, separately for each token count:
  step 1  no block keeps matmuls: activations kept after the forward, and the step's peak;
  step 2  one block keeps them, if twice a generous guess of its cost fits: its extra bytes;
  then    as many blocks as fit under the device's memory with a margin.
Where twice the guess for every block (and two more for the backward) fits outright, step 1 keeps
matmuls in every block instead and nothing is probed: each policy is a graph of its own to compile
(options.py), and a run that never needs the other policy never pays for it (a cold compile of one
block graph costs 14-28 s, bench/README.md, warm-up). Should every block later not fit (less memory,
an out-of-memory step), that token count's next step keeps none, which splits what the first one
kept into the plain part and the per-block part, and plans from there.
Once one token count is measured, a new one is not probed again: what it keeps and needs grows with
its tokens, so its first step runs the measured figures scaled to its tokens (per token, the largest
any measured count showed, plus a tenth), and its own measurements replace the scaled ones from then
on (the bucket's first step is then as fast as its last, not two slower probes).
A step that does not finish its backward (out of memory: the training step skips the batch) halves
the count for that token count from then on, wherever the memory is no larger than that step's was
(a limit set under a 24 GiB cap does not hold on the whole card). Numbers come from the CUDA
caching allocator; the step's peak is read, and the step learned from, when its backward reaches
the first block's input, since the training loop resets the peak at each step start, before the
forward (a peak never reset only makes the plan smaller; one read after the reset made the working
memory negative, and the plan too large). Learning there, not at the next forward, also hands each
step's figures at once to the other expert sharing them, and keeps the run's last step's.
The capacity planned for is the card's memory, or less where the process's allocator is capped
(`torch.cuda.set_per_process_memory_fraction`: a smaller card's budget on a larger one).

The measured figures are kept (`PlanStore`): planners of one process with the same key (both experts
of a run) share them, and they persist in a JSON file beside torch.compile's caches, so a second run
of the same config on the same card plans its first step of each known token count without probing,
and compiles (or loads) only the policies it keeps. The key (speed/options.plan_key) covers what the
figures depend on: the card, torch and diffusers, the block's parameters (shapes, dtypes: LoRA rank,
fp8), the checkpoint policies' code, the optimizer, attention backend and dropout; a changed one
measures afresh. A limit set by an out-of-memory step persists too (whatever the allocator's cap).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wan_assets.core.files import write_json

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

logger = logging.getLogger(__name__)
GIB = 2**30
SCALED_SAFETY = 1.1  # on per-token figures carried over from another token count
PLAN_FORMAT = 2  # in every key: a planner whose figures mean something else never reads old ones


@dataclass
class _Shape:
    """What is known about one token count."""

    kept_plain: int | None = None  # bytes kept by a forward where no block keeps matmuls
    per_block: float | None = None  # extra bytes per block that keeps matmuls
    kept_all: int | None = None  # bytes kept by a forward where every block keeps matmuls
    working: int = 0  # peak minus what the forward kept (the backward's working memory)
    limit: int | None = None  # most blocks allowed, after a step that ran out of memory
    limit_capacity: int | None = None  # the memory that step had: the limit holds up to it (None: always)
    scaled: bool = False  # the figures above are another token count's, scaled (not yet measured here)

    def limit_with(self, capacity: int, *, default: int) -> int:
        """The most blocks allowed with `capacity` bytes: the out-of-memory limit, unless it was set
        with less memory (a capped allocator, a card shared with another process) than this."""
        if self.limit is None:
            return default
        if self.limit_capacity is not None and capacity > self.limit_capacity + _margin(self.limit_capacity):
            return default
        return self.limit

    @property
    def split(self) -> bool:
        """Both the plain and the per-block figure are known (any count can be planned)."""
        return self.kept_plain is not None and self.per_block is not None

    @property
    def measured(self) -> bool:
        return (self.split or self.kept_all is not None) and not self.scaled


def _check_figures(shape: _Shape) -> None:
    """TypeError unless each figure read from a file is a number of the right kind (or None)."""
    number = (int, float)
    ok = (
        (shape.kept_plain is None or type(shape.kept_plain) is int)
        and (shape.per_block is None or (isinstance(shape.per_block, number) and shape.per_block > 0))
        and (shape.kept_all is None or type(shape.kept_all) is int)
        and type(shape.working) is int
        and (shape.limit is None or type(shape.limit) is int)
        and (shape.limit_capacity is None or type(shape.limit_capacity) is int)
        and type(shape.scaled) is bool
    )
    if not ok:
        raise TypeError(f"figures of the wrong kind: {shape}")


# This process's plans: (path, key) -> the figures, shared by the planners of that key; and how many
# token counts of each were read from the file.
_SHARED: dict[tuple[str, str], dict[int, _Shape]] = {}
_READ_COUNTS: dict[tuple[str, str], int] = {}


class PlanStore:
    """Measured figures per token count under one key: shared by the planners of a process that use
    the same key, and read from / written to `path` (one JSON object of keys; others are kept)."""

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key = path, key
        ident = (str(path), key)
        if ident not in _SHARED:
            _SHARED[ident] = self._read()
            _READ_COUNTS[ident] = len(_SHARED[ident])
        self.shapes = _SHARED[ident]
        self._saved = self._snapshot()

    def _read(self) -> dict[int, _Shape]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            entry = json.loads(self.path.read_text()).get(self.key, {})
            known = {f.name for f in fields(_Shape)}
            shapes = {int(t): _Shape(**{k: v for k, v in s.items() if k in known}) for t, s in entry.items()}
            for shape in shapes.values():
                _check_figures(shape)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("memory plan %s unreadable (%s): measuring afresh", self.path, exc)
            return {}
        return {t: s for t, s in shapes.items() if s.measured or s.limit is not None}

    def _snapshot(self) -> dict[str, dict]:
        # What is worth keeping: measured figures and limits, not scaled guesses.
        return {
            str(t): asdict(s) for t, s in sorted(self.shapes.items()) if s.measured or s.limit is not None
        }

    def save_if_new(self) -> None:
        """Write when a token count got measured or limited since the last write (not on every
        step's small drift: the next run measures again anyway)."""
        now = self._snapshot()
        new = {t for t, s in now.items() if self._saved.get(t, {}).get("limit") != s["limit"]}
        new |= now.keys() - self._saved.keys()
        if not new or self.path is None:
            return
        try:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[self.key] = now
        try:
            write_json(self.path, data)
        except OSError as exc:  # a plan not kept costs the next run two probe steps, nothing else
            logger.warning("memory plan not saved to %s: %s", self.path, exc)
            return
        self._saved = now


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
        store: PlanStore | None = None,
    ) -> None:
        """`guess_per_token`: a generous guess of the bytes per token one block adds by keeping its
        matmul outputs (only to decide whether a probe is safe); `memory()` -> (allocated, peak
        allocated, capacity), the CUDA allocator's by default; `store`: figures kept across planners
        and processes (none: this planner's own)."""
        self.blocks = blocks
        self.device = device
        self.guess_per_token = guess_per_token
        self.memory = memory or self._cuda_memory
        self.store = store
        self.shapes: dict[int, _Shape] = store.shapes if store is not None else {}
        # shape, count, allocated before forward, capacity: a step whose backward has not finished
        self._step: tuple[_Shape, int, int, int] | None = None
        self._after: int | None = None  # allocated after that forward

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
        """Choose this step's count (after a step that never finished its backward, a halved one), set
        the blocks' policies; the count."""
        allocated, _, capacity = self.memory()
        if self._step is not None:
            self._learn(peak=None)
        shape = self.shapes.setdefault(tokens, _Shape())
        count = self._choose(shape, tokens, allocated, capacity)
        for i, block in enumerate(self.blocks):
            block.wan_policy = "matmuls" if i < count else "attention"
        self._step, self._after = (shape, count, allocated, capacity), None
        return count

    def after_forward(self) -> None:
        self._after = self.memory()[0]

    def backward_finished(self) -> None:
        if self._step is not None:
            self._learn(peak=self.memory()[1])

    def _learn(self, *, peak: int | None) -> None:
        assert self._step is not None, "called for a step that ran"
        (shape, count, before, capacity), self._step = self._step, None
        self._record(shape, count, before, capacity, peak)
        if self.store is not None:
            self.store.save_if_new()

    def _record(self, shape: _Shape, count: int, before: int, capacity: int, peak: int | None) -> None:
        if peak is None or self._after is None:
            if count > 0:  # out of memory (or a skipped step): never try this many again with this memory
                shape.limit, shape.limit_capacity = count // 2, capacity
            return
        kept = self._after - before
        working = peak - self._after
        blocks = len(self.blocks)
        if shape.scaled:
            # The first step of this token count ran on scaled figures: what it kept and needed is
            # measured now; the split between plain and per-block keeps the scaled per-block figure.
            shape.scaled, shape.working = False, working
            if not shape.split:  # scaled from every-block figures, and every block kept matmuls
                shape.kept_all = kept
                return
            assert shape.per_block is not None, "a split shape carries a per-block figure"
            shape.kept_plain = max(kept - int(count * shape.per_block), 0)
            return
        shape.working = max(shape.working, working)
        if count == 0:
            shape.kept_plain = kept
            if shape.kept_all is not None and shape.per_block is None:
                shape.per_block = max(shape.kept_all - kept, 1) / blocks
        elif shape.kept_plain is not None:
            shape.per_block = max(kept - shape.kept_plain, 1) / count
        elif count == blocks:
            shape.kept_all = kept

    def _choose(self, shape: _Shape, tokens: int, allocated: int, capacity: int) -> int:
        blocks = len(self.blocks)
        limit = shape.limit_with(capacity, default=blocks)
        if shape.kept_plain is None and shape.kept_all is None:
            self._scale_from_measured(shape, tokens)
        if limit == 0:
            return 0
        room = capacity - _margin(capacity) - allocated
        if shape.split:
            assert shape.kept_plain is not None and shape.per_block is not None, "split figures"
            return max(0, min(limit, int((room - shape.kept_plain - shape.working) // shape.per_block)))
        if shape.kept_plain is not None:  # probe one block, and only where even a bad guess fits
            return 1 if room - shape.kept_plain - shape.working > 2 * self.guess_per_token * tokens else 0
        if shape.kept_all is not None:  # only a step with every block keeping matmuls is known
            if limit >= blocks and room >= shape.kept_all + shape.working:
                return blocks
            if shape.scaled:  # another count's figures: this one measures from scratch
                shape.kept_all, shape.working, shape.scaled = None, 0, False
            return 0
        if limit >= blocks and room > 2 * self.guess_per_token * tokens * (blocks + 2):
            return blocks  # every block at once, where even a bad guess fits: no probes, one policy
        return 0

    def _scale_from_measured(self, shape: _Shape, tokens: int) -> None:
        """Fill a new token count's figures from the measured ones, per token (the largest, plus a tenth)."""
        usable = {t: m for t, m in self.shapes.items() if m.measured and m.limit is None}
        split = {t: m for t, m in usable.items() if m.split}
        measured = split or usable  # every-block figures only where no count has split ones
        if not measured:
            return

        def scaled(value: Callable[[_Shape], float]) -> float:
            return SCALED_SAFETY * tokens * max(value(m) / t for t, m in measured.items())

        if split:
            shape.kept_plain = int(scaled(lambda m: m.kept_plain or 0))
            shape.per_block = scaled(lambda m: m.per_block or 0.0)
        else:
            shape.kept_all = int(scaled(lambda m: m.kept_all or 0))
        shape.working = int(scaled(lambda m: m.working))
        shape.scaled = True


def _margin(capacity: int) -> int:
    """Memory left unplanned: fragmentation and what the measurement missed."""
    return 2 * GIB + capacity // 25


def plan_summary() -> str | None:
    """One line on the memory plans of this process: token counts measured, how many came from an
    earlier run's file, and where they are kept; None when no planner ran."""
    parts = []
    for ident, shapes in _SHARED.items():
        if shapes:
            measured = sum(1 for s in shapes.values() if s.measured)
            parts.append(
                f"{measured} token counts measured, {_READ_COUNTS[ident]} of them read from {ident[0]}"
            )
    return "memory plan: " + "; ".join(parts) if parts else None
