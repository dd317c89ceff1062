"""LoRA on embeddings: ``lora_embedding``, its autograd Function, and ``LoRAEmbedding``.

    y = E[ids] + s * (A[:, ids])^T B^T,    E (V, D), A (R, V), B (D, R)

A and B in PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` layouts. PEFT applies
no dropout to embedding adapters, and neither does lorakern. The math of the
kernels is in ``lorakern.kernels.lora_embedding``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ._backend import load_kernels, select_backend
from ._validation import check_scalars, check_tensors_on_one_device
from .modules import LoRALayer, _check_lora_args
from .ops import lora_embedding_op

ID_DTYPES = (torch.int32, torch.int64)


def _check_embedding_tensors(ids, weight, lora_A, lora_B):
    named = {"ids": ids, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    check_tensors_on_one_device(named, float_names=("weight", "lora_A", "lora_B"))
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"ids has dtype {ids.dtype}; token ids must be torch.int32 or "
                        f"torch.int64")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), got shape "
                         f"{tuple(weight.shape)}")
    num_embeddings, dim = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != num_embeddings or lora_A.shape[0] == 0:
        raise ValueError(f"lora_A must be (r >= 1, num_embeddings={num_embeddings}), got shape "
                         f"{tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (dim, lora_A.shape[0]):
        raise ValueError(f"lora_B must be (embedding_dim={dim}, r={lora_A.shape[0]}) to match "
                         f"weight {tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}, got "
                         f"shape {tuple(lora_B.shape)}")


def _check_padding_idx(padding_idx, num_embeddings):
    """padding_idx as a non-negative int (or None), as nn.Embedding normalises it."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx={padding_idx} is outside [-{num_embeddings}, "
                         f"{num_embeddings}) for num_embeddings={num_embeddings}")
    return padding_idx % num_embeddings


def check_ids_in_range(ids, num_embeddings):
    """Every id in [0, num_embeddings): checked before any kernel (one device sync)."""
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range for an embedding of "
                         f"num_embeddings={num_embeddings} (ids must be in [0, "
                         f"{num_embeddings - 1}])")


def reference_lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx=None):
    """The layer in plain PyTorch (the CPU backend and the tests' oracle): PEFT's
    math, the rank product in the promoted dtype of A and B, y in weight's dtype."""
    base = F.embedding(ids, weight, padding_idx)
    lora_dtype = torch.promote_types(lora_A.dtype, lora_B.dtype)
    after_a = F.embedding(ids, lora_A.to(lora_dtype).t(), padding_idx)
    lora = F.linear(after_a, lora_B.to(lora_dtype)) * scale
    total = torch.promote_types(weight.dtype, lora_dtype)
    return (base.to(total) + lora.to(total)).to(weight.dtype)


def fused_embedding_forward(ids, weight, lora_A, lora_B, scale):
    """y [*ids.shape, D] from the kernels; the autograd Function and the custom op
    (ops.py) both launch through here."""
    kernels = load_kernels(weight.device)
    y = kernels.lora_embedding_forward(ids.reshape(-1), weight, lora_A, lora_B, scale)
    return y.reshape(*ids.shape, weight.shape[1])


def fused_embedding_backward(grad_y, ids, weight, lora_A, lora_B, scale, padding_idx, needs):
    """(dE, dA, dB), None where ``needs`` (three flags, in that order) is False."""
    need_e, need_a, need_b = needs
    kernels = load_kernels(grad_y.device)
    flat = ids.reshape(-1)
    dy = grad_y.reshape(flat.shape[0], weight.shape[1])
    return kernels.lora_embedding_backward(dy, flat, weight, lora_A, lora_B, scale,
                                           padding_idx, need_a, need_b, need_e)


class FusedLoRAEmbedding(torch.autograd.Function):
    """``FusedLoRAEmbedding.apply(ids, weight, lora_A, lora_B, scale, padding_idx)``.

    Saves only the ids and references to E, A and B: no T x D or V x D tensor.
    """

    @staticmethod
    def forward(ctx, ids, weight, lora_A, lora_B, scale, padding_idx):
        ctx.save_for_backward(ids, weight, lora_A, lora_B)
        ctx.scale, ctx.padding_idx = scale, padding_idx
        return fused_embedding_forward(ids, weight, lora_A, lora_B, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        ids, weight, lora_A, lora_B = ctx.saved_tensors
        grads = fused_embedding_backward(grad_y, ids, weight, lora_A, lora_B, ctx.scale,
                                         ctx.padding_idx, ctx.needs_input_grad[1:4])
        return (None,) + tuple(grads) + (None, None)


def lora_embedding(ids, weight, lora_A, lora_B, scale=1.0, padding_idx=None):
    """y = weight[ids] + scale * (lora_A[:, ids])^T lora_B^T, fused.

    Args:
        ids: token ids of any shape, torch.int32 or torch.int64, each in
            ``[0, num_embeddings)`` (checked before any kernel runs).
        weight: ``[num_embeddings, embedding_dim]``, float16/bfloat16/float32.
        lora_A: ``[r, num_embeddings]``; lora_B: ``[embedding_dim, r]`` (PEFT's
            ``lora_embedding_A`` / ``lora_embedding_B``), any float dtype.
        scale: s, e.g. alpha / r.
        padding_idx: as nn.Embedding's: that row of weight and that column of
            lora_A get no gradient.
    Returns:
        ``[*ids.shape, embedding_dim]`` in weight's dtype.

    Under torch.compile the kernels run as one custom op, which checks the ids'
    range when it runs (the reference path there relies on F.embedding's check).
    """
    _check_embedding_tensors(ids, weight, lora_A, lora_B)
    scale, _ = check_scalars(scale, 0.0)
    padding_idx = _check_padding_idx(padding_idx, weight.shape[0])
    fused = select_backend(weight, lora_A, lora_B) == "triton"
    if torch.compiler.is_compiling():
        if fused:  # an opaque custom op that checks the ids' range itself
            return lora_embedding_op(ids, weight, lora_A, lora_B, scale, padding_idx)
        return reference_lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx)
    check_ids_in_range(ids, weight.shape[0])
    if not fused:
        return reference_lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx)
    return FusedLoRAEmbedding.apply(ids, weight, lora_A, lora_B, scale, padding_idx)


class LoRAEmbedding(LoRALayer):
    """``nn.Embedding`` plus a LoRA adapter, computed by the fused kernels.

        y = E[ids] + s * (A[:, ids])^T B^T,    s = alpha / r  (alpha / sqrt(r) for rsLoRA)

    Args:
        num_embeddings, embedding_dim, padding_idx, max_norm, norm_type: as
            ``nn.Embedding`` (the base table is drawn as nn.Embedding draws it).
        r, alpha, use_rslora: as ``LoRALinear``.
        device, dtype: of the base table.
        adapter_dtype: of ``lora_A`` and ``lora_B``; None: float32 on a
            float16/bfloat16 table, else the table's dtype.

    Attributes: ``weight`` (num_embeddings, embedding_dim) frozen, ``lora_A``
    (r, num_embeddings) and ``lora_B`` (embedding_dim, r) in PEFT's
    ``lora_embedding_A``/``lora_embedding_B`` layouts, initialised as PEFT does
    (A zeros, B normal), ``scale``, ``merged``; merging, unmerging and the state
    dict as ``LoRALinear``. The base module's ``padding_idx`` (no gradient to that
    row of E or that column of A) and ``max_norm`` (E's looked-up rows renormalised
    in place, as nn.Embedding does) are kept. No dropout: PEFT applies none to
    embedding adapters.
    """

    def __init__(self, num_embeddings, embedding_dim, r=8, alpha=16, padding_idx=None,
                 max_norm=None, norm_type=2.0, use_rslora=False, device=None, dtype=None,
                 adapter_dtype=None):
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx,
                            max_norm=max_norm, norm_type=norm_type, device=device, dtype=dtype)
        _check_lora_args(r, alpha, 0.0, "kaiming", adapter_dtype)
        super().__init__()
        self._setup(base, r, alpha, use_rslora, adapter_dtype)

    @classmethod
    def from_embedding(cls, embedding, r=8, alpha=16, use_rslora=False, adapter_dtype=None):
        """Wrap an ``nn.Embedding``: the new layer holds its own ``weight`` Parameter
        (no copy), frozen, its padding_idx and max_norm, and fresh adapters."""
        embedding_layout(embedding)
        _check_lora_args(r, alpha, 0.0, "kaiming", adapter_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(embedding, r, alpha, use_rslora, adapter_dtype)
        layer.train(embedding.training)
        return layer

    def _setup(self, base, r, alpha, use_rslora, adapter_dtype):
        num_embeddings, embedding_dim = base.weight.shape
        # an embedding is the linear map of one-hot ids, its table stored (in, out)
        self._setup_adapter(base.weight, num_embeddings, embedding_dim, True, r, alpha,
                            use_rslora, adapter_dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = (base.padding_idx, base.max_norm,
                                                           base.norm_type)
        self.dropout = 0.0
        self._add_adapters()

    def reset_lora_parameters(self):
        """PEFT's init for embedding adapters: A zeros, B standard normal."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def forward(self, ids):
        if self.max_norm is not None:
            with torch.no_grad():  # as F.embedding: the looked-up rows of E, in place
                torch.embedding_renorm_(self.weight, ids, self.max_norm, self.norm_type)
        if self._merged:
            return F.embedding(ids, self.weight, self.padding_idx)
        return lora_embedding(ids, self.weight, self.lora_A, self.lora_B, self.scale,
                              self.padding_idx)

    def extra_repr(self):
        parts = [f"{self.num_embeddings}, {self.embedding_dim}", f"r={self.r}",
                 f"alpha={self.alpha}", f"scale={self.scale:g}"]
        if self.use_rslora:
            parts.append("use_rslora=True")
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        if self.max_norm is not None:
            parts.append(f"max_norm={self.max_norm}, norm_type={self.norm_type}")
        parts.append(f"merged={self._merged}")
        return ", ".join(parts)


def embedding_layout(embedding):
    """TypeError unless ``embedding`` is an nn.Embedding that LoRAEmbedding can serve."""
    if isinstance(embedding, LoRAEmbedding):
        raise TypeError("from_embedding got a LoRAEmbedding: the layer already has an adapter")
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"from_embedding takes an nn.Embedding, got {type(embedding).__name__}")
    if type(embedding).forward is not nn.Embedding.forward:
        raise TypeError(f"{type(embedding).__name__} overrides nn.Embedding.forward (a scaled "
                        f"embedding?); LoRAEmbedding reproduces only nn.Embedding's lookup")
    if not embedding.weight.dtype.is_floating_point:
        raise TypeError(f"the embedding has a {embedding.weight.dtype} table; LoRAEmbedding "
                        f"needs a floating-point one")
    for flag in ("scale_grad_by_freq", "sparse"):
        if getattr(embedding, flag):
            raise TypeError(f"the embedding sets {flag}=True, which LoRAEmbedding does not "
                            f"support")
