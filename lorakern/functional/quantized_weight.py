"""A LoRA linear layer over a frozen bitsandbytes 4-bit or 8-bit base weight (QLoRA).

    y = x W^T + b + s * (drop(x) A^T) B^T,    W = dequant(packed W, its scales)

The base is read through a ``QuantizedWeight`` (a ``BaseWeight``), whose
``kernel_operand`` is a ``kernels.QuantizedOperand`` (the packed storage and its
scales, nothing dequantised). The launch sequence serves it by either strategy
(``kernels/lora_layer.py``), chosen per call as for a 16-bit base (the table by
token count, the tuner on CUDA, or ``LORAKERN_STRATEGY``):

- ``fused``: ``kernels/qlora_gemm.py``, lora_gemm with W's tiles dequantised in
  its main loop: 4 (or 8) bits read a weight and no buffer, which wins at decode;
- ``cublas``: W dequantised by ``kernels/dequant_bnb.py`` into a transient
  buffer of the compute dtype, torch's matmul with the LoRA term as its C
  operand, the buffer dropped when that product returns; it wins at large M,
  where each program of the fused GEMM would dequantise its slice of W again.

Both dequantise bit-exactly as bitsandbytes does. Nothing of W in 16 bits is
saved for the backward: the autograd Function keeps x, A, B, h as for a 16-bit
base, and a reference to the quantised storage. dW is never computed (the base
is frozen).

Compute dtype. As bitsandbytes' ``Linear4bit``: x is cast to the layer's
``compute_dtype`` (else the quant state's dtype), W dequantised in the quant
state's dtype and cast to it, y cast back to x's dtype. The LoRA branch then
reads x in the compute dtype, where PEFT reads the uncast x: for an fp32 x and a
bf16 compute dtype (``prepare_model_for_kbit_training``) the branch input
differs by one bf16 rounding of x.

8-bit bases. bitsandbytes' LLM.int8() quantises the activations too (row-wise
int8, outlier columns above its threshold in 16 bits) and multiplies int8 by
int8. Here the product is x (compute dtype) times the dequantised weight
CB * SCB / 127 in the compute dtype: the error is the weight's quantisation
alone, the activations are not rounded to 8 bits, so it is closer to the
product with the original weights; it differs from bitsandbytes' own output by
LLM.int8()'s activation rounding.

Backends: with the Triton kernels (CUDA, or CPU under the interpreter) as above;
on the reference backend the same math in PyTorch under activation
checkpointing (torch.utils.checkpoint), so that autograd saves no dequantised W
there either.
"""
import torch
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable

from . import reference
from .base_weight import BaseWeight
from .dispatch import load_kernels, select_backend
from . import fused_linear
from .fused_linear import fused_backward, fused_forward
from .validation import check_scalars

INT8_INVERSE_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127, as it multiplies


class QuantizedWeight(BaseWeight):
    """A frozen quantised W, dequantised on demand into the compute dtype."""

    def __init__(self, name, shape, compute_dtype, device):
        self.name = name
        self._shape = torch.Size(shape)
        self._dtype = compute_dtype
        self._device = device

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def kernel_operand(self):
        """A ``kernels.QuantizedOperand``: the GEMMs dequantise it as they read it
        (``fused``) or into a buffer for one product (``cublas``)."""
        return load_kernels(self.device).QuantizedOperand(**self._operand_fields())

    def _operand_fields(self):
        raise NotImplementedError

    def grad_buffer(self, empty):
        raise TypeError(f"{self.name}: a quantised base weight is frozen; it has no gradient")

    def dequantize(self, kernels=None):
        """W (out, in) in the compute dtype; ``kernels`` None: in PyTorch."""
        raise NotImplementedError


class Bnb4bitWeight(QuantizedWeight):
    """bitsandbytes' ``Params4bit``: packed codes and a ``QuantState``."""

    def __init__(self, name, packed, state, compute_dtype):
        super().__init__(name, state.shape, compute_dtype, packed.device)
        self.packed, self.state = packed, state

    def _operand_fields(self):
        state = self.state
        tensors = (self.packed, state.absmax, state.code)
        blocksize2 = 0
        if state.nested:
            tensors += (state.state2.absmax, state.state2.code, state.offset)
            blocksize2 = state.state2.blocksize
        kind = "nf4" if state.quant_type == "nf4" else "fp4"
        return dict(base_kind=kind, tensors=tensors, weight_shape=tuple(state.shape),
                    state_dtype=state.dtype, dtype=self.dtype, blocksize=state.blocksize,
                    blocksize2=blocksize2)

    def dequantize(self, kernels=None):
        if kernels is not None:
            return self.kernel_operand().dense()
        state = self.state
        nested = {}
        if state.nested:
            nested = dict(absmax2=state.state2.absmax, code2=state.state2.code,
                          blocksize2=state.state2.blocksize, offset=state.offset)
        w = reference_dequantize_4bit(self.packed, state.absmax, state.code, state.blocksize,
                                      state.shape, state.dtype, **nested)
        return w if w.dtype == self.dtype else w.to(self.dtype)


class Bnb8bitWeight(QuantizedWeight):
    """bitsandbytes' ``Int8Params``: CB (out, in) int8 and SCB (out,) fp32."""

    def __init__(self, name, cb, scb, compute_dtype):
        super().__init__(name, cb.shape, compute_dtype, cb.device)
        self.cb, self.scb = cb, scb

    def _operand_fields(self):
        return dict(base_kind="int8", tensors=(self.cb, self.scb),
                    weight_shape=tuple(self.cb.shape), state_dtype=torch.float32,
                    dtype=self.dtype)

    def dequantize(self, kernels=None):
        if kernels is None:
            return ((self.cb.to(torch.float32) * self.scb.view(-1, 1)) * INT8_INVERSE_SCALE
                    ).to(self.dtype)
        return self.kernel_operand().dense()


def reference_dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, *, absmax2=None,
                              code2=None, blocksize2=256, offset=None):
    """``kernels.dequantize_4bit`` in PyTorch: the same fp32 products, in the same order."""
    numel = torch.Size(shape).numel()
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack((data >> 4, data & 0xF), dim=-1).reshape(-1)[:numel].long()
    if absmax2 is not None:
        second = absmax2.repeat_interleave(blocksize2)[:absmax.numel()]
        absmax = code2[absmax.long()] * second + offset
    scales = absmax.to(torch.float32).repeat_interleave(blocksize)[:numel]
    return (code[codes] * scales).reshape(shape).to(dtype)


def _class_names(obj):
    return {cls.__name__ for cls in type(obj).__mro__}


def bnb_base_weight(module, name, x_dtype):
    """The ``QuantizedWeight`` of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
    (``name``: the module's name, for errors), computing in the dtype bitsandbytes
    would: ``compute_dtype`` (4-bit; else the quant state's dtype) or x's (8-bit).

    Raises ValueError naming the module for a layer that is not quantised yet
    (no quant state, or no CB/SCB), on the meta device, in bitsandbytes' CPU
    inference packing, or of a type not covered; nothing is changed.
    """
    classes = _class_names(module)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.device.type == "meta":
        raise ValueError(f"{name}: the quantised weight of this {type(module).__name__} is on "
                         f"the meta device; load the model's weights before using it")
    if "Linear4bit" in classes and weight is not None and "Params4bit" in _class_names(weight):
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError(f"{name}: this {type(module).__name__} has no quant state (its "
                             f"weight is not quantised yet: bitsandbytes quantises it when it "
                             f"is moved to a device)")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(f"{name}: this {type(module).__name__}'s weight is in "
                             f"bitsandbytes' CPU inference packing, which lorakern does not "
                             f"read; keep the layer in training mode or with inputs that "
                             f"require grad on CPU")
        if state.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"{name}: quant_type {state.quant_type!r} is not covered (nf4, "
                             f"fp4)")
        compute_dtype = getattr(module, "compute_dtype", None) or state.dtype
        return Bnb4bitWeight(name, weight.data, state, compute_dtype)
    if "Linear8bitLt" in classes and weight is not None and "Int8Params" in _class_names(weight):
        # after its first forward bitsandbytes moves CB and SCB to module.state and
        # keeps the int8 rows as weight.data (PEFT's dequantize_bnb_weight reads them so)
        state = getattr(module, "state", None)
        cb = weight.data if weight.dtype == torch.int8 else getattr(weight, "CB", None)
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(state, "SCB", None)
        if cb is None or scb is None or cb.dtype != torch.int8:
            raise ValueError(f"{name}: this {type(module).__name__} holds no int8 weight (CB "
                             f"and SCB; has_fp16_weights=True or not yet moved to a device)")
        return Bnb8bitWeight(name, cb, scb, x_dtype)
    raise ValueError(f"{name}: {type(module).__name__} is not a quantised base lorakern covers "
                     f"(bitsandbytes Linear4bit with Params4bit, Linear8bitLt with Int8Params)")


def _check_call(x, base, lora_A, lora_B, bias):
    out_features, in_features = base.shape
    name = base.name
    if x.shape[-1] != in_features:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the base weight "
                         f"{tuple(base.shape)} takes {in_features}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != in_features \
            or lora_B.shape != (out_features, lora_A.shape[0]):
        raise ValueError(f"{name}: lora_A {tuple(lora_A.shape)} and lora_B "
                         f"{tuple(lora_B.shape)} do not fit a base of {tuple(base.shape)} "
                         f"(expected (r, {in_features}) and ({out_features}, r))")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{name}: bias {tuple(bias.shape)}, expected ({out_features},)")
    devices = {t.device for t in (x, lora_A, lora_B, bias) if t is not None} | {base.device}
    if len(devices) > 1:
        raise ValueError(f"{name}: x, lora_A, lora_B, bias and the base weight are on "
                         f"{sorted(map(str, devices))}; they must share one device")


def quantized_lora_linear(x, base, lora_A, lora_B, scale=1.0, bias=None, dropout_p=0.0):
    """y = x W^T + bias + scale * (drop(x) A^T) B^T over a ``QuantizedWeight`` ``base``.

    x: ``[..., in_features]``, cast to ``base.dtype`` for the products and y cast
    back to x's dtype (as bitsandbytes' layers do); lora_A ``[r, in]``, lora_B
    ``[out, r]`` (fp32 adapters as PEFT builds them, or the compute dtype); bias
    ``[out]``, cast to the compute dtype. Checked before anything runs.
    """
    _check_call(x, base, lora_A, lora_B, bias)
    scale, dropout_p = check_scalars(scale, dropout_p)
    x_dtype = x.dtype
    xc = x.to(base.dtype)
    bias = None if bias is None else bias.to(base.dtype)
    with torch.autocast(x.device.type, enabled=False):
        if select_backend(xc, lora_A, lora_B, bias) == "reference":
            y = torch.utils.checkpoint.checkpoint(_reference_call, xc, lora_A, lora_B, bias,
                                                  base, scale, dropout_p, use_reentrant=False)
        else:
            y = QuantizedLoRALinear.apply(xc, lora_A, lora_B, bias, base, scale, dropout_p)
    return y.to(x_dtype)


def _reference_call(x, lora_A, lora_B, bias, base, scale, dropout_p):
    return reference.lora_linear_unchecked(x, base.dequantize(), lora_A, lora_B, scale, bias,
                                           dropout_p)


class QuantizedLoRALinear(torch.autograd.Function):
    """``apply(x, lora_A, lora_B, bias, base, scale, dropout_p)``, x in ``base.dtype``."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, base, scale, dropout_p):
        # through the module: a seed patched there (tests) reaches this layer too
        seed = fused_linear.draw_seed() if dropout_p > 0.0 else 0
        y, h = fused_forward(x, base, lora_A, lora_B, bias, scale, dropout_p, seed)
        _, need_a, need_b = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if need_a else None, lora_A, lora_B, h if need_b else None)
        ctx.base, ctx.scale, ctx.dropout_p, ctx.seed = base, scale, dropout_p, seed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        grad_x, _, grad_a, grad_b, grad_bias = fused_backward(
            grad_y, x, ctx.base, lora_A, lora_B, h, ctx.scale, ctx.dropout_p, ctx.seed,
            (need_x, False, need_a, need_b, need_bias))
        return grad_x, grad_a, grad_b, grad_bias, None, None, None
