"""A frozen linear and its LoRA product written into one output buffer (docs/architecture.md §10).

`addmm(base, low, up^T)` cannot write into `base`: ATen's out-of-place addmm first copies `base`
into a new buffer, then runs the GEMM on it with beta = 1, and inductor lowers it the same way. On
an A14B expert that is one device-to-device copy of every linear's full output per forward (and
per recompute): 400-800 copies, 1-2% of a step. The ops here allocate the output once: the base
GEMM writes it (bias in its epilogue) and the LoRA GEMM accumulates into it in place.

- `linear_lora(x, W, b, low, up) = x @ W^T + b + low @ up^T`, 2-D, one dtype. A custom op with its
  own autograd formula, so torch.compile sees one opaque op (selective checkpointing saves its
  output as one matmul output, speed/options.py) and traces the backward's matmuls as usual.
- `scaled_mm_lora`: the same for the fp8 base (quantize.py), forward only; `Float8LoraMatmul`
  gives it the frozen fp8 linear's backward plus the LoRA gradients.
"""

from __future__ import annotations

import torch

from wan_assets.core.model.quantize import input_gradient, quantize_rows, scaled_matmul


@torch.library.custom_op("wan_assets::linear_lora", mutates_args=())
def linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return out.addmm_(low, up.t())


@linear_lora.register_fake
def _(x, weight, bias, low, up):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_lora_setup(ctx, inputs, output) -> None:
    x, weight, _bias, low, up = inputs
    # x only for a trained base weight: a frozen one (every LoRA run) must not keep each linear's
    # input alive in eager mode (compiled graphs drop what backward never reads anyway).
    ctx.save_for_backward(x if weight.requires_grad else None, weight, low, up)


def _linear_lora_backward(ctx, grad):
    x, weight, low, up = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (
        grad @ weight if need[0] else None,
        grad.t() @ x if need[1] else None,
        grad.sum(0) if need[2] else None,
        grad @ up if need[3] else None,
        grad.t() @ low if need[4] else None,
    )


linear_lora.register_autograd(_linear_lora_backward, setup_context=_linear_lora_setup)


@torch.library.custom_op("wan_assets::scaled_mm_lora", mutates_args=())
def scaled_mm_lora(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    low: torch.Tensor,
    up: torch.Tensor,
) -> torch.Tensor:
    out = scaled_matmul(a, b, scale_a, scale_b, fast_accum=True, bias=bias)
    return out.addmm_(low, up.t())


@scaled_mm_lora.register_fake
def _(a, b, scale_a, scale_b, bias, low, up):
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)


class Float8LoraMatmul(torch.autograd.Function):
    """x @ W^T + b + low @ up^T with W = w_fp8 * w_scale (rows), in bf16: the fp8 base's forward
    and input gradient (quantize.py's `_Float8FrozenMatmul`) plus the LoRA product's gradients."""

    @staticmethod
    def forward(ctx, x_mk, w_nk, w_scale_n, w_t_kn, bias, low, up):
        x_q, x_scale = quantize_rows(x_mk)
        ctx.save_for_backward(w_nk, w_scale_n, w_t_kn, low, up)
        return scaled_mm_lora(x_q, w_nk.t(), x_scale, w_scale_n.view(1, -1), bias, low, up)

    @staticmethod
    def backward(ctx, grad_mn):
        w_nk, w_scale_n, w_t_kn, low, up = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (
            input_gradient(grad_mn, w_nk, w_scale_n, w_t_kn) if need[0] else None,
            None,
            None,
            None,
            None,
            grad_mn @ up if need[5] else None,
            grad_mn.t() @ low if need[6] else None,
        )


FUSED_OPS = frozenset({torch.ops.wan_assets.linear_lora.default, torch.ops.wan_assets.scaled_mm_lora.default})
