"""Frozen base linears of an expert in low precision: fp8 compute and weight-only storage (docs/architecture.md §10).

The base weights of a LoRA run never change, so they are quantized once, here, not on every step:
- `Float8FrozenLinear`: e4m3 weights with one scale per output channel, matmuls on the fp8 tensor
  cores (torch._scaled_mm, rowwise scales) forward and for the input gradient. No weight gradient is
  ever computed and no activation is saved for it. torchao's `convert_to_float8_training` targets
  trained weights: it re-quantizes the weight on every call and computes a weight gradient in
  backward even when the weight is frozen, a third GEMM that a LoRA run throws away.
- weight-only int8 / fp8 through torchao `quantize_` (memory mode without fp8 compute): the weight
  is dequantized for each matmul, which runs in the compute dtype.
- weight-only uint4 (`UInt4FrozenLinear`, ai-toolkit's `qtype: uint4`): two 4-bit values per byte,
  an fp scale and minimum per group of 64 input channels (torchao's UIntX weight-only layout),
  dequantized for each matmul. torchao's own int4 (tinygemm) has no backward pass, so it cannot
  train a LoRA; this one backpropagates to the input through the dequantized weight on any device.
LoRA adapters (peft `lora_A` / `lora_B`) are never touched: they train in their own dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Spellings of model.qtype (ai-toolkit's, plus plain names); "uint4|adapter" keeps its first part.
QTYPES: dict[str, str] = {
    "qfloat8": "fp8",
    "float8": "fp8",
    "fp8": "fp8",
    "qint8": "int8",
    "int8": "int8",
    "uint4": "int4",
    "int4": "int4",
    "qint4": "int4",
}


def parse_qtype(qtype: str) -> str:
    """model.qtype -> "fp8" | "int8" | "int4", or one clear error."""
    key = qtype.split("|", 1)[0].strip().lower()
    if key not in QTYPES:
        raise ValueError(
            f"model.qtype {qtype!r} is not supported; use one of {', '.join(sorted(QTYPES))} "
            "(qfloat8 = fp8 weight-only, qint8 = int8, uint4 = 4-bit with a scale per 64 weights)"
        )
    return QTYPES[key]


# --- which linears -----------------------------------------------------------------------------------


def base_linears(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, linear) for every frozen linear in `module` (a transformer block).

    peft wraps an adapted linear as `lora.Linear` whose `base_layer` is the original nn.Linear; the
    adapter's own `lora_A` / `lora_B` linears are skipped.
    """
    for parent in list(module.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and not _is_adapter(parent):
                yield parent, attr, child


def _is_adapter(parent: torch.nn.Module) -> bool:
    # lora_A / lora_B are ModuleDicts of nn.Linear keyed by adapter name.
    return isinstance(parent, torch.nn.ModuleDict)


# --- fp8 compute ---------------------------------------------------------------------------------------


def quantize_rows(x_mk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and fp32 scales [M, 1] with one scale per row (x ~= q * scale)."""
    amax = x_mk.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x_mk.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def scaled_matmul(
    a_mk: torch.Tensor,
    b_kn: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    *,
    fast_accum: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) (+ bias, in the GEMM's epilogue) in bf16 for e4m3 a (row-major)
    and b (column-major)."""
    bias = bias.to(torch.bfloat16) if bias is not None else None
    if a_mk.is_cuda:
        return torch._scaled_mm(
            a_mk,
            b_kn,
            scale_a=scale_a,
            scale_b=scale_b,
            bias=bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
    # CPU has no fp8 tensor cores: the same arithmetic in fp32, so tests can check the math.
    out = (a_mk.float() * scale_a) @ (b_kn.float() * scale_b)
    return (out if bias is None else out + bias.float()).to(torch.bfloat16)


def input_gradient(
    grad_mn: torch.Tensor, w_nk: torch.Tensor, w_scale_n: torch.Tensor, w_t_kn: torch.Tensor | None
) -> torch.Tensor:
    """dx = g @ W for W = diag(w_scale) w_nk, on the fp8 tensor cores: = (g * s) @ W_q, the weight's
    scale folds into the gradient's columns, so the stored e4m3 weight serves as it is."""
    g_q, g_scale = quantize_rows(grad_mn.float() * w_scale_n)
    # Column-major [N, K]: the stored transpose when kept, else made for this call.
    w_cm = w_t_kn.t() if w_t_kn is not None else w_nk.t().contiguous().t()
    ones = torch.ones(1, w_nk.shape[1], device=w_nk.device, dtype=torch.float32)
    return scaled_matmul(g_q, w_cm, g_scale, ones, fast_accum=False)


class _Float8FrozenMatmul(torch.autograd.Function):
    """y = x @ W^T with W = w_fp8 * w_scale (rows); gradient for x only (W is frozen)."""

    @staticmethod
    def forward(ctx, x_mk, w_nk, w_scale_n, w_t_kn):
        x_q, x_scale = quantize_rows(x_mk)
        ctx.save_for_backward(w_nk, w_scale_n, w_t_kn)
        # w_nk is row-major [N, K], so its transpose is the column-major [K, N] _scaled_mm wants.
        return scaled_matmul(x_q, w_nk.t(), x_scale, w_scale_n.view(1, -1), fast_accum=True)

    @staticmethod
    def backward(ctx, grad_mn):
        w_nk, w_scale_n, w_t_kn = ctx.saved_tensors
        return input_gradient(grad_mn, w_nk, w_scale_n, w_t_kn), None, None, None


class Float8FrozenLinear(torch.nn.Module):
    """A frozen nn.Linear with e4m3 weights (one scale per output channel) and fp8 matmuls.

    `keep_transposed` stores a second, transposed copy of the weight for the backward matmul (same
    memory as bf16, fastest); without it the copy is made per backward call (half the memory).
    """

    # The buffers registered in __init__, typed (nn.Module's attribute lookup types them loosely).
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    weight_fp8_t: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, *, keep_transposed: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        w_q, w_scale = quantize_rows(weight)
        self.register_buffer("weight_fp8", w_q)
        self.register_buffer("weight_scale", w_scale.view(-1))
        self.register_buffer("weight_fp8_t", w_q.t().contiguous() if keep_transposed else None)
        bias = linear.bias.detach().to(weight.dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @staticmethod
    def supports(linear: torch.nn.Linear) -> bool:
        # _scaled_mm needs both matrix sides in multiples of 16.
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def keep_transposed(self, keep: bool) -> None:
        if not keep:
            self.weight_fp8_t = None
        elif self.weight_fp8_t is None:
            self.weight_fp8_t = self.weight_fp8.t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_mk = x.reshape(-1, self.in_features)
        y = _Float8FrozenMatmul.apply(x_mk, self.weight_fp8, self.weight_scale, self.weight_fp8_t)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kept = self.weight_fp8_t is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, transposed_copy={kept}"


def to_float8(block: torch.nn.Module, *, keep_transposed: bool) -> int:
    """Swap every frozen linear of `block` for a Float8FrozenLinear (in place, on its device)."""
    swapped = 0
    for parent, attr, linear in list(base_linears(block)):
        if Float8FrozenLinear.supports(linear):
            setattr(parent, attr, Float8FrozenLinear(linear, keep_transposed=keep_transposed))
            swapped += 1
    for module in block.modules():  # a block swapped earlier: drop or add the transposed copies
        if isinstance(module, Float8FrozenLinear):
            module.keep_transposed(keep_transposed)
    return swapped


def fp8_problem(device: torch.device) -> str | None:
    """Why rowwise fp8 matmuls cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return f"this is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        return f"this is {name} (sm_{major}{minor})"
    try:  # rowwise scaling needs a recent enough torch / cuBLASLt build as well as the chip
        a = torch.ones(16, 16, device=device).to(E4M3)
        scale = torch.ones(16, 1, device=device)
        scaled_matmul(a, a.t(), scale, scale.view(1, -1), fast_accum=True)
    except RuntimeError as exc:
        return f"rowwise torch._scaled_mm fails on {name} (sm_{major}{minor}): {exc}"
    return None


# --- weight-only (torchao) -------------------------------------------------------------------------------


def weight_only(block: torch.nn.Module, kind: str) -> None:
    """Weight-only quantization of the frozen linears of `block`, on its device (torchao for fp8
    and int8, UInt4FrozenLinear for int4)."""
    if kind == "int4":
        for parent, attr, linear in list(base_linears(block)):
            setattr(parent, attr, UInt4FrozenLinear(linear))
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = {"fp8": Float8WeightOnlyConfig, "int8": Int8WeightOnlyConfig}[kind]()
    targets = {id(linear) for _, _, linear in base_linears(block)}
    quantize_(block, config, filter_fn=lambda module, _fqn: id(module) in targets)


UINT4_GROUP = 64


class UInt4FrozenLinear(torch.nn.Module):
    """A frozen nn.Linear stored as asymmetric uint4: w ~= q * scale + minimum per group of
    UINT4_GROUP input channels (one group per row when in_features is not a multiple of it).

    Memory per weight: half a byte plus two compute-dtype numbers per group. The forward dequantizes
    the weight (no grad) and runs the matmul in the input's dtype, so autograd gives the input (and
    the LoRA beside it) its gradient and the weight none.
    """

    packed: torch.Tensor  # [N, K // 2] uint8, low nibble = even column
    scale: torch.Tensor  # [N, K // group, 1]
    minimum: torch.Tensor  # [N, K // group, 1]
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        n, k = weight.shape
        assert k % 2 == 0, "uint4 packs two input channels per byte"
        self.group = UINT4_GROUP if k % UINT4_GROUP == 0 else k
        groups = weight.float().reshape(n, k // self.group, self.group)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((groups - low) / scale).round_().clamp_(0, 15).to(torch.uint8).reshape(n, k)
        self.register_buffer("packed", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.register_buffer("minimum", low.to(weight.dtype))
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] in `dtype`."""
        n, k = self.out_features, self.in_features
        q = torch.stack((self.packed & 15, self.packed >> 4), dim=-1).reshape(n, k // self.group, self.group)
        return (q.to(dtype) * self.scale.to(dtype) + self.minimum.to(dtype)).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"
