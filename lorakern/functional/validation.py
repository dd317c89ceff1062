"""Argument checks of the functional calls (``lora_linear``, ``lora_embedding``), shared
by every backend: they run before any kernel does, and name the offending shapes,
dtypes or devices."""
import inspect
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t):
    return tuple(t.shape)


def check_tensors_on_one_device(named, float_names):
    """Every value of ``named`` ({name: value}) a tensor, those in ``float_names`` of a
    float dtype lorakern takes, all on one device; errors name the offenders."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name in float_names and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; lorakern takes float16, bfloat16, "
                            f"float32 or float64")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_tensors(x, weight, lora_A, lora_B, bias):
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    check_tensors_on_one_device(named, float_names=tuple(named))

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                         f"{_shape(weight)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x of shape {_shape(x)} does not match weight of shape "
                         f"{_shape(weight)}: x's last dimension must be in_features="
                         f"{in_features}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be (r, in_features={in_features}), got shape "
                         f"{_shape(lora_A)}")
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError(f"LoRA rank r must be at least 1, got r=0 (lora_A shape "
                         f"{_shape(lora_A)})")
    if _shape(lora_B) != (out_features, rank):
        raise ValueError(f"lora_B must be (out_features={out_features}, r={rank}) to match "
                         f"weight {_shape(weight)} and lora_A {_shape(lora_A)}, got shape "
                         f"{_shape(lora_B)}")
    if bias is not None and _shape(bias) != (out_features,):
        raise ValueError(f"bias must be (out_features={out_features},), got shape "
                         f"{_shape(bias)}")


def check_base_dtypes(x, weight, bias):
    """x, weight and bias share one dtype, as nn.Linear requires (after autocast)."""
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        bias_part = "" if bias is None else f", bias {bias.dtype}"
        raise TypeError(f"x, weight and bias must share one dtype, got x {x.dtype}, weight "
                        f"{weight.dtype}{bias_part} (lora_A and lora_B may differ)")


def _graph_breaking_reader(name):
    """``tensor.item()`` run outside torch.compile's trace, where a tensor's value is
    unknown (read there, it would make every check of the value a data-dependent
    guard). Without fullgraph the call breaks the graph and tracing goes on with the
    number; with fullgraph=True torch.compile refuses the call, giving this reason."""
    reason = (f"{name} is a tensor inside torch.compile: lorakern takes {name} as a "
              f"constant of the graph, and reading a tensor's value out needs a graph break, "
              f"which fullgraph=True forbids. Pass {name} as a Python float (the number "
              f"itself, or {name}.item() taken outside the compiled function)")

    def read_out(tensor):
        return tensor.item()

    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return torch.compiler.disable(read_out, reason=reason)
    return torch.compiler.disable(read_out)  # an older torch takes no reason


_READ_OUT_WITH_A_GRAPH_BREAK = {name: _graph_breaking_reader(name)
                                for name in ("scale", "dropout_p")}


def _plain_number(value, name):
    """A Python number for ``value``: a one-element tensor without grad is read out (under
    torch.compile with a graph break, so fullgraph=True refuses it); a symbolic number
    under torch.compile becomes a constant of the graph (a layer's scale and dropout do
    not change from call to call)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise TypeError(f"{name} is a tensor that requires grad; lorakern treats {name} "
                            f"as a constant and computes no gradient for it: pass a float "
                            f"(or {name}.detach() if it should stay fixed)")
        if value.numel() != 1:
            raise TypeError(f"{name} must be a real number or a one-element tensor, got a "
                            f"tensor of shape {tuple(value.shape)}")
        if torch.compiler.is_compiling():
            return _READ_OUT_WITH_A_GRAPH_BREAK[name](value)
        return value.item()
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return float(value)
    return value


def check_scalars(scale, dropout_p):
    """Returns (scale, dropout_p) as Python floats."""
    scale = _plain_number(scale, "scale")
    dropout_p = _plain_number(dropout_p, "dropout_p")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not -math.inf < scale < math.inf:  # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"scale must be finite, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(scale), float(dropout_p)


def lora_compute_dtype(*tensors):
    """The dtype the LoRA term is computed in: the promoted dtype of its operands (x, A
    and B for the linear layer, A and B for the embedding)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def scaling_dtype(compute_dtype):
    """The dtype that holds s when the LoRA term, computed in ``compute_dtype``, is
    scaled: float32 for float16, bfloat16 and float32 (the kernels multiply in fp32, and
    torch scales a 16-bit tensor by a Python number in fp32 too), float64 for float64."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _overflow_threshold(dtype):
    """The smallest magnitude that rounds to infinity in ``dtype``: halfway between its
    largest finite value and the next power of two (the tie rounds to even: infinity)."""
    largest = torch.finfo(dtype).max
    if largest >= torch.finfo(torch.float64).max:
        return math.inf  # every finite Python float is finite in float64
    return (largest + 2.0 ** math.ceil(math.log2(largest))) / 2


def check_scale_fits(scale, compute_dtype, operands):
    """``scale`` (a Python float) stays finite in the dtype the LoRA term is scaled in:
    a scale that rounds to infinity there would turn a zero term (B = 0) into NaN.
    ``operands`` names the tensors whose promoted dtype ``compute_dtype`` is."""
    bound_dtype = scaling_dtype(compute_dtype)
    threshold = _overflow_threshold(bound_dtype)
    if not abs(scale) < threshold:  # comparisons, not torch: torch.compile traces them
        raise ValueError(f"scale={scale!r} is not finite in {bound_dtype}, the dtype the LoRA "
                         f"term is scaled in when it is computed in {compute_dtype} (the "
                         f"promoted dtype of {operands}): |scale| must be below "
                         f"{threshold:.8g}")


# ------------------------------------------------------------------ the LoRA embedding
ID_DTYPES = (torch.int32, torch.int64)


def check_embedding_tensors(ids, weight, lora_A, lora_B):
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


def check_padding_idx(padding_idx, num_embeddings):
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
