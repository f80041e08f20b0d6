"""An exponential moving average of the LoRA weights (ai-toolkit's `train.ema_config`, toolkit/ema.py).

As in ai-toolkit, after every optimizer step every trained parameter's average moves toward it:
shadow = decay * shadow + (1 - decay) * param, in fp32, started from the initial weights. With both
experts training, the paused expert's average keeps moving toward its (unchanged) weights too.
ai-toolkit saves and samples only the averaged weights; here both are kept: the raw LoRA files as
always and `_ema` files beside them (docs/architecture.md §5.1), and evaluation scores both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class LoraEMA:
    def __init__(self, params: dict[str, list[torch.nn.Parameter]], decay: float) -> None:
        self.decay = decay
        self.params = params
        self.shadow = {e: [p.detach().float().clone() for p in ps] for e, ps in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for expert, params in self.params.items():
            shadows = self.shadow[expert]
            targets = [p.detach().float().to(s.device) for p, s in zip(params, shadows, strict=True)]
            torch._foreach_lerp_(shadows, targets, 1.0 - self.decay)

    @contextmanager
    def applied(self, expert: str) -> Iterator[None]:
        """`expert`'s LoRA holds the averaged weights inside the block (to save or sample them)."""
        params = self.params[expert]
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow[expert], strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw, strict=True):
                    p.copy_(r)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {e: [s.clone() for s in shadows] for e, shadows in self.shadow.items()}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        for expert, shadows in self.shadow.items():
            for s, saved in zip(shadows, state[expert], strict=True):
                s.copy_(saved)
