"""Activation offload (docs/architecture.md §10, memory mode): block inputs wait in pinned CPU memory for backward.

Each transformer block runs, as two halves (block_parts.py), without keeping activations; each half's
input is copied to pinned host memory on a side stream while the next halves compute. In backward a
half's input comes back (the one before it is prefetched meanwhile), the half is recomputed with the
forward's RNG and autocast state, and gradients flow to the input and to its trainable (LoRA)
parameters. The GPU then holds no activations between forward and backward, whatever the number of
blocks, and in backward one half's at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from wan_assets.core.speed import block_parts


@dataclass
class _Slot:
    host: torch.Tensor  # the block input, in (pinned) CPU memory
    stored: torch.cuda.Event | None = None  # device -> host copy done
    loaded: torch.Tensor | None = None  # back on the device (prefetched)
    ready: torch.cuda.Event | None = None  # host -> device copy done


class ActivationOffloader:
    """Stores block inputs in forward order and hands them back in reverse, one ahead."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.slots: list[_Slot] = []
        self._pinned: dict[int, torch.Tensor] = {}  # reused across steps while shapes repeat

    def begin(self) -> None:
        """A new forward pass: earlier slots are done with (their backward has run)."""
        self.slots.clear()

    def store(self, tensor: torch.Tensor) -> int:
        index = len(self.slots)
        if self.stream is None:
            self.slots.append(_Slot(tensor.detach().clone()))
            return index
        host = self._pinned_buffer(index, tensor)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
            stored = torch.cuda.Event()
            stored.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.slots.append(_Slot(host, stored))
        return index

    def load(self, index: int) -> torch.Tensor:
        slot = self.slots[index]
        if self.stream is None:
            return slot.host
        self._prefetch(slot)
        if index > 0:
            self._prefetch(self.slots[index - 1])  # the next backward's input
        current = torch.cuda.current_stream(self.device)
        assert slot.ready is not None and slot.loaded is not None, "prefetched above"
        current.wait_event(slot.ready)
        tensor, slot.loaded = slot.loaded, None
        tensor.record_stream(current)
        return tensor

    def _prefetch(self, slot: _Slot) -> None:
        if slot.loaded is not None:
            return
        assert self.stream is not None and slot.stored is not None, "a slot stored on the side stream"
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(slot.stored)
            slot.loaded = slot.host.to(self.device, non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.stream)

    def _pinned_buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        buffer = self._pinned.get(index)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self._pinned[index] = buffer
        return buffer


def offloaded_block(block: torch.nn.Module, hidden: torch.Tensor, *rest, offloader: ActivationOffloader):
    """diffusers' gradient-checkpointing hook: run `block` with its input offloaded.

    A Wan block runs as its two halves (block_parts.py), each offloaded and recomputed on its own, so
    backward holds one half's activations at a time; any other block runs whole.
    """
    halves = block_parts.split(block)
    units = [(h, tuple(h.trainable())) for h in halves] if halves else [(block, _trainable(block))]
    for unit, params in units:
        hidden = _OffloadedBlock.apply(_BlockCall(unit, rest, params, offloader), hidden, *params)
    return hidden


def _trainable(module: torch.nn.Module) -> tuple[torch.nn.Parameter, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


@dataclass
class _BlockCall:
    block: torch.nn.Module
    rest: tuple  # encoder states, time embedding, rotary tables: shared by all blocks, kept as they are
    params: tuple[torch.nn.Parameter, ...]
    offloader: ActivationOffloader


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _BlockCall, hidden: torch.Tensor, *params: torch.nn.Parameter) -> torch.Tensor:
        ctx.call = call
        ctx.slot = call.offloader.store(hidden)
        ctx.rng = _RngState(hidden.device)
        ctx.autocast = _autocast_state(hidden.device.type)
        if not hidden.requires_grad:
            # The first block's input (the frozen patch embedding's output). A compiled half guards
            # on its input's requires_grad, so it is handed in as a leaf that asks for grad (under
            # no_grad: no graph, no copy), the graph every other half runs. Making the embedding's
            # output itself ask for grad would keep it, and its gradient, on the GPU for the whole
            # step: a token x width tensor twice, at 480x832x81 the margin of a 24 GiB card.
            hidden = hidden.detach().requires_grad_(True)
        with torch.no_grad():
            return call.block(hidden, *call.rest)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        call = ctx.call
        wants_hidden = ctx.needs_input_grad[1]
        # Asking for grad whether or not its gradient is wanted: the same compiled graph for every half.
        hidden = call.offloader.load(ctx.slot).detach().requires_grad_(True)
        params = [p for p, needs in zip(call.params, ctx.needs_input_grad[2:], strict=True) if needs]
        with ctx.rng.restored(), torch.enable_grad(), torch.autocast(**ctx.autocast):
            out = call.block(hidden, *call.rest)
        inputs = ([hidden] if wants_hidden else []) + params
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        grad_hidden = grads.pop(0) if wants_hidden else None
        grad_params = iter(grads)
        return (None, grad_hidden, *(next(grad_params) if n else None for n in ctx.needs_input_grad[2:]))


def _autocast_state(device_type: str) -> dict:
    return {
        "device_type": device_type,
        "dtype": torch.get_autocast_dtype(device_type),
        "enabled": torch.is_autocast_enabled(device_type),
    }


class _RngState:
    """The CPU and device generator states at a block's forward (LoRA dropout replays exactly)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield
