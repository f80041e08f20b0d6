"""Flow matching for Wan (docs/architecture.md §5): timesteps inside an expert's window, noising, target, loss.

x_t = (1 - s) x0 + s eps with s = t / 1000, target eps - x0, MSE over all latent frames.
Timesteps are drawn by inverse CDF restricted to the expert's window, so a sample can never land
in the other expert's range (the seed drew from a 1000-entry table with an off-by-one that sometimes
routed a sample to the wrong expert).
"""

from __future__ import annotations

import torch

from wan_assets.core.experts import NUM_TRAIN_TIMESTEPS


def _window_fraction(lo: float, hi: float) -> tuple[float, float]:
    return lo / NUM_TRAIN_TIMESTEPS, hi / NUM_TRAIN_TIMESTEPS


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def sample_timesteps(
    kind: str, window: tuple[float, float], n: int, generator: torch.Generator, *, shift: float = 3.0
) -> torch.Tensor:
    """n timesteps in (lo, hi] (fp64 -> fp32), distributed as `kind` restricted to the window.

    uniform: flat; sigmoid: logit-normal N(0, 1) (as SD3 / ai-toolkit "sigmoid"); shift: uniform s
    mapped through shift*s / (1 + (shift-1)*s), the flow-shift used by Wan.
    """
    s_lo, s_hi = _window_fraction(*window)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if kind in ("uniform", "linear"):
        s = s_hi - u * (s_hi - s_lo)
    elif kind == "sigmoid":
        # Inverse CDF of the logit-normal between the window's ends.
        c_lo = torch.special.ndtr(_logit(torch.tensor(s_lo, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)))
        c_hi = torch.special.ndtr(_logit(torch.tensor(s_hi, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)))
        s = torch.sigmoid(torch.special.ndtri(c_hi - u * (c_hi - c_lo)))
    elif kind == "shift":
        # Sample the unshifted s in the preimage of the window, then shift it.
        def unshift(v: float) -> float:
            return v / (shift - (shift - 1) * v)

        a_lo, a_hi = unshift(s_lo), unshift(s_hi)
        a = a_hi - u * (a_hi - a_lo)
        s = shift * a / (1 + (shift - 1) * a)
    else:
        raise ValueError(f"unknown timestep_type {kind!r}; use uniform, sigmoid or shift")
    # Keep strictly inside (lo, hi] despite rounding at the ends.
    t = (s * NUM_TRAIN_TIMESTEPS).clamp(min=window[0], max=window[1])
    if window[0] > 0:
        t = torch.where(
            t <= window[0], torch.nextafter(torch.tensor(window[0], dtype=t.dtype), t.new_tensor(1e9)), t
        )
    return t.float()


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for a batch; t has one timestep per sample in [0, 1000]."""
    s = (t.to(x0.dtype) / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error of each sample over all its latent elements (fp32)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(pred, target).mean()
