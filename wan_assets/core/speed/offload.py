"""Activation offload (docs/architecture.md §10, memory mode): block inputs wait in pinned CPU memory for backward.

Each transformer block runs, as two halves (block_parts.py), without keeping activations; each half's
input, and the attention half's self-attention output and log-sum-exp (attention.py), are copied to
pinned host memory on a side stream while the next halves compute. In backward a half's tensors come
back (the next one back is prefetched meanwhile), the half is recomputed with the forward's RNG and
autocast state, taking the self-attention output from the tape instead of running it again, and
gradients flow to the input and to its trainable (LoRA) parameters. The GPU then holds no activations
between forward and backward, whatever the number of blocks, and in backward one half's at a time.
Pinned host memory per step: 3 x blocks x tokens x width x 2 bytes (bf16), about 25 GiB at
512x512x81 and 38 GiB at 480x832x81 for an A14B expert.
"""

from __future__ import annotations

import functools
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from wan_assets.core.speed import block_parts
from wan_assets.core.speed.attention import AttentionTape, taping

MAX_IN_FLIGHT = 1 << 30  # bytes of stored tensors whose device -> host copy may be pending


@dataclass
class _Slot:
    host: torch.Tensor  # the block input, in (pinned) CPU memory
    stored: torch.cuda.Event | None = None  # device -> host copy done
    loaded: torch.Tensor | None = None  # back on the device (prefetched)
    ready: torch.cuda.Event | None = None  # host -> device copy done


class ActivationOffloader:
    """Stores each half's tensors in forward order and hands them back in reverse.

    A half's input starts a group; its taped attention outputs join it (`with_previous`). Loading a
    half's input prefetches the next half back's input, and nothing more: at 480x832x81 under a 24
    GiB cap, prefetching the next half's taped outputs too (two more token x width tensors) was the
    difference between fitting and running out of memory. A half's own taped outputs are prefetched
    when its backward starts (`prefetch`) and waited for only where the recompute uses them.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.slots: list[_Slot] = []
        self._group: list[int] = []  # per slot, the first slot of its group (its half's input)
        self._pinned: dict[int, torch.Tensor] = {}  # reused across steps while shapes repeat
        self._in_flight: deque[tuple[torch.cuda.Event, int]] = deque()  # stores not yet copied, bytes

    def begin(self) -> None:
        """A new forward pass: earlier slots are done with (their backward has run)."""
        self.slots.clear()
        self._group.clear()
        self._in_flight.clear()

    def store(self, tensor: torch.Tensor, *, with_previous: bool = False) -> int:
        """Send `tensor` to host memory; `with_previous` joins it to the group of the slot before."""
        index = len(self.slots)
        self._group.append(self._group[-1] if with_previous and self._group else index)
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
        self._bound_in_flight(stored, tensor.numel() * tensor.element_size())
        return index

    def _bound_in_flight(self, stored: torch.cuda.Event, size: int) -> None:
        """Wait for the oldest copies while more than MAX_IN_FLIGHT bytes wait to be copied.

        A stored tensor's memory is reusable only once its copy has run, and the allocator's figures
        count it as free meanwhile: the host queues the forward far ahead of the GPU, and the GPU's
        compute can outrun the copies, so without a bound the stored tensors of many blocks would
        be held at once, reserved beyond what the peak shows.
        """
        self._in_flight.append((stored, size))
        pending = sum(s for _, s in self._in_flight)
        while pending > MAX_IN_FLIGHT and len(self._in_flight) > 1:
            oldest, oldest_size = self._in_flight.popleft()
            oldest.synchronize()
            pending -= oldest_size

    def load(self, index: int) -> torch.Tensor:
        """Slot `index` back on the device; a half's input also starts the next half back's copy."""
        slot = self.slots[index]
        if self.stream is None:
            return slot.host
        self.prefetch(index)
        following = self.next_back(index)
        if following is not None:  # its copy runs while this half's backward computes
            self.prefetch(following)
        current = torch.cuda.current_stream(self.device)
        assert slot.ready is not None and slot.loaded is not None, "prefetched above"
        current.wait_event(slot.ready)
        tensor, slot.loaded = slot.loaded, None
        tensor.record_stream(current)  # freed by the compute: reusable once the compute is past it
        return tensor

    def next_back(self, index: int) -> int | None:
        """For a half's input, the input of the half before it (the next backward's); else None."""
        first = self._group[index]
        return self._group[first - 1] if index == first and first > 0 else None

    def prefetch(self, index: int) -> None:
        """Start copying slot `index` back to the device (on the side stream, into its pool: the
        copies reuse the same few token x width blocks there, and never wait for the compute)."""
        slot = self.slots[index]
        if self.stream is None or slot.loaded is not None:
            return
        assert slot.stored is not None, "a slot stored on the side stream"
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(slot.stored)
            slot.loaded = slot.host.to(self.device, non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.stream)

    def _pinned_buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        buffer = self._pinned.get(index)
        if (
            buffer is None
            or buffer.shape != like.shape
            or buffer.stride() != like.stride()
            or buffer.dtype != like.dtype
        ):
            # Same strides (the attention output's layout is the kernel's): the copies are plain memcpys.
            buffer = torch.empty_like(like, device="cpu", pin_memory=True)
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
        ctx.tape = AttentionTape(keep=functools.partial(call.offloader.store, with_previous=True))
        ctx.rng = _RngState(hidden.device)
        ctx.autocast = _autocast_state(hidden.device.type)
        if not hidden.requires_grad:
            # The first block's input (the frozen patch embedding's output). A compiled half guards
            # on its input's requires_grad, so it is handed in as a leaf that asks for grad (under
            # no_grad: no graph, no copy), the graph every other half runs. Making the embedding's
            # output itself ask for grad would keep it, and its gradient, on the GPU for the whole
            # step: a token x width tensor twice, at 480x832x81 the margin of a 24 GiB card.
            hidden = hidden.detach().requires_grad_(True)
        with torch.no_grad(), taping(ctx.tape):
            return call.block(hidden, *call.rest)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        call = ctx.call
        wants_hidden = ctx.needs_input_grad[1]
        # This half's taped outputs copy back while its projections recompute; the recompute waits
        # for them only at the attention (the replay loads them). Then its input, which starts the
        # next half back's input copying. It asks for grad whether or not its gradient is wanted:
        # the same compiled graph for every half.
        for index in ctx.tape.handles():
            call.offloader.prefetch(index)
        hidden = call.offloader.load(ctx.slot).detach().requires_grad_(True)
        params = [p for p, needs in zip(call.params, ctx.needs_input_grad[2:], strict=True) if needs]
        tape = ctx.tape.replay(call.offloader.load)
        with ctx.rng.restored(), torch.enable_grad(), torch.autocast(**ctx.autocast), taping(tape):
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
