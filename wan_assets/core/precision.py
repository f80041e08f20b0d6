"""Compute dtypes: the config names, and the one autocast rule training, sampling and scoring share.

The frozen base weights are stored in the compute dtype (bf16 by default); the LoRA adapter keeps
fp32 master weights and its input up-cast is switched off (speed/options.py), so an expert only runs under
autocast in that dtype. Every forward of a trained expert goes through `autocast` below.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def dtype_problem(name: str, device: torch.device) -> str | None:
    """Why `train.dtype` `name` cannot train on `device`, or None."""
    if device.type == "cpu" and DTYPES[name] == torch.float16:
        return "train.dtype fp16 needs a GPU; use bf16 or fp32 on CPU"
    return None


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`; off in fp32 (nothing to cast)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextmanager
def autocast_forward(
    modules: Iterable[torch.nn.Module], device: torch.device, dtype: torch.dtype
) -> Iterator[None]:
    """Run each module's forward under `autocast` while inside, and nothing else.

    For a pipeline that calls the experts itself (sampling): the VAE and the text encoder around
    them keep their own dtypes, as at inference.
    """
    patched = []
    for module in dict.fromkeys(modules):
        plain = module.forward

        def forward(*args, _plain=plain, **kwargs):
            with autocast(device, dtype):
                return _plain(*args, **kwargs)

        module.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
