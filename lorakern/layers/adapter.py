"""``LoRALayer``: what every lorakern adapter layer shares, whatever its base.

A frozen base ``weight`` stored (out, in), or (in, out) when ``fan_in_fan_out``;
the adapters ``lora_A`` (r, in) and ``lora_B`` (out, r) in PEFT's layouts;
``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA); the argument checks of
every layer's constructor (``check_lora_args``).

Merging adds ``s * B @ A`` into ``weight`` in place, in float32, a block of
``MERGE_CHUNK_ROWS`` stored rows at a time: the extra memory is a few
``MERGE_CHUNK_ROWS x cols`` float32 buffers, never an out x in temporary.

A layer on the meta device has no values to merge: merging or unmerging it is
refused (ValueError), the flag left as it is. The state dict loaded later
carries the merged flag it was saved with.

The state dict carries the merged state with the weight (``_extra_state``):
``load_state_dict`` gives a layer the merged flag of the layer it was saved
from, so a merged checkpoint loads as a merged layer (``unmerge()`` works on
it), whatever the state of the layer it is loaded into.

A load is all or none over the LoRA layers: the first LoRA layer that
``nn.Module.load_state_dict`` reaches checks the entries of every LoRA layer
of the model being loaded (merged flag, shapes), and if any is refused no
LoRA layer is written (the error names each refused layer). Modules without
an adapter load as torch loads them.

``r``, ``alpha``, ``scale`` (and ``dropout``) are plain Python numbers whatever
was passed (numpy scalars, a one-element tensor for ``scale``), so that
configs built from them serialise as JSON.
"""
import math
import numbers
import sys

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..functional.validation import check_scalars

# Stored rows of the base weight merged per step. One step holds the fp32 delta
# of those rows (4 bytes an element), its cast to the weight dtype (2 bytes for
# bf16/fp16, none for fp32) and a finiteness mask (1 byte): for cols = 8192 and
# a bf16 weight, 1024 x 8192 x 7 bytes = 56 MiB, whatever the number of rows.
MERGE_CHUNK_ROWS = 1024

INITS = ("kaiming", "gaussian")
_EXTRA_STATE = "_extra_state"  # the state dict key torch gives get_extra_state's value
# the attribute that records, on torch's private copy of the state dict being loaded,
# the refusals of that load's LoRA layers: computed once, by the first layer reached
_LOAD_REFUSALS = "_lora_layer_refusals"
_LOAD_STATE_DICT_CODE = nn.Module.load_state_dict.__code__
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_lora_args(r, alpha, dropout, init, adapter_dtype):
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got alpha={alpha!r}")
    if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
            or not 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got dropout={dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got init={init!r}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype)
                                          and adapter_dtype.is_floating_point):
        raise ValueError(f"adapter_dtype must be a floating torch.dtype or None, got "
                         f"adapter_dtype={adapter_dtype!r}")


def plain_number(value):
    """A numbers.Real (numpy scalars included) as a Python int, if integral, or float."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def default_adapter_dtype(base_dtype):
    """PEFT's default: fp32 adapters on a float16/bfloat16 base, else the base dtype."""
    return torch.float32 if base_dtype in _HALF_DTYPES else base_dtype


def _merged_state(state):
    """(merged, merged scale) from a LoRALinear ``_extra_state`` tensor; ValueError
    naming the value for anything else."""
    ok = (isinstance(state, torch.Tensor) and state.dtype.is_floating_point
          and state.shape == (2,) and bool(torch.isfinite(state).all())
          and float(state[0]) in (0.0, 1.0))
    if not ok:
        raise ValueError(f"a LoRA layer's _extra_state is a float tensor [merged (0 or 1), scale "
                         f"merged with], got {state!r}")
    merged = float(state[0]) == 1.0
    return merged, (float(state[1]) if merged else None)


class LoRALayer(nn.Module):
    """What every lorakern adapter layer shares: a frozen base ``weight`` stored
    (out, in), or (in, out) when ``fan_in_fan_out``; the adapters ``lora_A`` (r, in)
    and ``lora_B`` (out, r); ``scale``; merging ``s * B @ A`` into the weight and
    back; and the merged flag in the state dict (``_extra_state``, see
    ``LoRALinear``). ``merge_lora``/``unmerge_lora`` act on every LoRALayer."""

    def _setup_adapter(self, weight, in_features, out_features, fan_in_fan_out, r, alpha,
                       use_rslora, adapter_dtype):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.r = int(r)
        self.alpha = plain_number(alpha)
        self.use_rslora = bool(use_rslora)
        self.scale = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self._merged = False
        self._merged_scale = None
        self.weight = weight
        self.weight.requires_grad_(False)
        self._adapter_dtype = adapter_dtype

    def _add_adapters(self):
        """lora_A and lora_B, registered after the base parameters (state dict order)."""
        adapters = {"device": self.weight.device,
                    "dtype": self._adapter_dtype or default_adapter_dtype(self.weight.dtype)}
        del self._adapter_dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **adapters))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **adapters))
        self.reset_lora_parameters()

    @property
    def merged(self):
        """Whether ``s * B @ A`` is currently added into ``weight``."""
        return self._merged

    @property
    def scale(self):
        """s in ``y = base(x) + s * B A x``, a Python float."""
        return self._scale

    @scale.setter
    def scale(self, value):
        # read out once here (a one-element tensor, a numpy number), so that every
        # forward, merge, repr and saved config sees the same plain float; a value the
        # forward would refuse is refused now, the old scale kept
        self._scale, _ = check_scalars(value, 0.0)

    def _merge_refusal(self):
        """Why this layer cannot hold its adapter merged into its weight; None if it can."""
        return None

    # ------------------------------------------------------------------ state dict
    def get_extra_state(self):
        # a tensor, not a dict: state dicts stay all-tensor (safetensors can save them),
        # float64 so that the scale comes back bit for bit
        scale = self._merged_scale if self._merged else 0.0
        return torch.tensor([float(self._merged), scale], dtype=torch.float64)

    def set_extra_state(self, state):
        self._merged, self._merged_scale = _merged_state(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        refusals, first_reached = self._load_refusals(state_dict, prefix)
        if refusals:
            if first_reached:  # reported once for the whole load
                error_msgs.extend(refusals)
            return
        before = (self._merged, self._merged_scale)
        try:  # again: a module shared under two names may have changed since the check
            after = self._incoming_merged_state(state_dict, prefix)
        except ValueError as err:
            error_msgs.append(f"{type(self).__name__} '{prefix[:-1]}': {err}")
            return
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        extra_key = prefix + _EXTRA_STATE
        if extra_key not in state_dict and extra_key in missing_keys:
            missing_keys.remove(extra_key)  # an older state dict: loads as unmerged
        failed = len(error_msgs) > errors_before  # torch's own errors, e.g. a failed copy
        self._merged, self._merged_scale = before if failed else after

    def _load_refusals(self, state_dict, prefix):
        """(refusals of this load's LoRA layers, whether this layer is the first of the
        load to ask). Torch loads module after module, each from the entries under its
        own prefix only; the whole state dict and the model being loaded are those of
        the ``nn.Module.load_state_dict`` call below on the stack, so the first LoRA
        layer reached checks every LoRA layer of that model before any is written."""
        load = _enclosing_load(self, prefix)
        if load is None:  # called other than through nn.Module.load_state_dict
            return _refusals([(prefix, self)], state_dict), True
        model, whole_state_dict = load
        refusals = getattr(whole_state_dict, _LOAD_REFUSALS, None)
        if refusals is not None:
            return refusals, False
        layers = [(name + "." if name else "", module)
                  for name, module in model.named_modules(remove_duplicate=False)
                  if isinstance(module, LoRALayer)]
        refusals = _refusals(layers, whole_state_dict)
        setattr(whole_state_dict, _LOAD_REFUSALS, refusals)
        return refusals, True

    def _incoming_merged_state(self, state_dict, prefix):
        """(merged, merged scale) the layer has after loading ``state_dict``;
        ValueError if the state dict cannot give a consistent layer."""
        extra = state_dict.get(prefix + _EXTRA_STATE)
        incoming = None if extra is None else _merged_state(extra)
        cannot_merge = self._merge_refusal()
        if incoming is not None and incoming[0] and cannot_merge:
            raise ValueError(f"the state dict holds a merged layer: {cannot_merge}")
        if prefix + "weight" in state_dict:
            return incoming or (False, None)
        current = (self._merged, self._merged_scale)
        if incoming is not None and incoming[0] != current[0]:
            raise ValueError(f"the state dict says merged={incoming[0]} but holds no weight, and "
                             f"this layer is merged={current[0]}")
        adapters = [k for k in ("lora_A", "lora_B") if prefix + k in state_dict]
        if current[0] and adapters:
            raise ValueError(f"the state dict holds {' and '.join(adapters)} but no weight, and "
                             f"this layer is merged: its weight would keep the old adapter merged "
                             f"in; unmerge() it first, or load a state dict with the weight")
        return current

    # ------------------------------------------------------------------ merging
    def merge(self):
        """Add ``scale * B @ A`` into ``weight`` in place (float32, chunked).

        Raises RuntimeError when already merged, ValueError (weight untouched)
        when the merged weight would hold a non-finite value.
        """
        if self._merged:
            raise RuntimeError(f"{type(self).__name__}.merge: the adapter is already merged into "
                               f"the weight; call unmerge() first")
        self._apply_delta(+1.0)

    def unmerge(self):
        """Subtract the merged ``scale * B @ A`` from ``weight`` (float32, chunked).

        The weight comes back to within the two roundings of a merge and an
        unmerge: one unit in the last place of the merged weight's magnitude.
        Raises RuntimeError when not merged.
        """
        if not self._merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the adapter is not merged into "
                               f"the weight")
        self._apply_delta(-1.0)

    def _delta_scale(self, sign):
        # unmerge subtracts what merge added, even if ``scale`` was changed since
        return self.scale if sign > 0 else self._merged_scale

    def _apply_delta(self, sign, check=True):
        """Merge (sign +1) or unmerge (-1); with ``check``, every chunk is checked
        finite before any is written."""
        scale = self._delta_scale(sign)
        if check:
            self._check_delta(sign, scale)
        self._write_delta(sign, scale)
        self._merged = sign > 0
        self._merged_scale = scale if sign > 0 else None

    def _delta_chunks(self, sign, scale):
        """Yields (stored weight rows, W + sign * scale * delta over those rows in the
        weight's dtype): the stored layout, (out, in) or (in, out) when
        fan_in_fan_out, in blocks of MERGE_CHUNK_ROWS rows."""
        weight = self.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        a = self.lora_A.to(device=weight.device, dtype=compute)
        b = self.lora_B.to(device=weight.device, dtype=compute)
        rows = weight.shape[0]
        step = max(1, int(MERGE_CHUNK_ROWS))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            if self.fan_in_fan_out:  # stored rows are input features: (A^T B^T)[start:stop]
                delta = a[:, start:stop].t() @ b.t()
            else:
                delta = b[start:stop] @ a
            # the same ops in merge and unmerge, so both use the same delta bits
            delta.mul_(sign * scale)
            delta.add_(weight[start:stop])
            yield weight[start:stop], delta.to(weight.dtype)

    @torch.no_grad()
    def _check_delta(self, sign, scale):
        """Raises ValueError if the layer cannot be merged (or unmerged), or if any merged
        (or unmerged) weight would be non-finite."""
        name = type(self).__name__
        cannot_merge = self._merge_refusal()
        if sign > 0 and cannot_merge:
            raise ValueError(f"{name}: {cannot_merge}; the weight is left unchanged")
        on_meta = [t for t, p in (("weight", self.weight), ("lora_A", self.lora_A),
                                  ("lora_B", self.lora_B)) if p.device.type == "meta"]
        if on_meta:
            what = "merge" if sign > 0 else "unmerge"
            raise ValueError(f"{name}: {', '.join(on_meta)} on the meta device hold no values, "
                             f"so there is nothing to {what}; load the weights first (a state "
                             f"dict saved merged loads as a merged layer); merged={self._merged} "
                             f"is left as it is")
        for _, new in self._delta_chunks(sign, scale):
            if not torch.isfinite(new).all():
                what = "merging" if sign > 0 else "unmerging"
                raise ValueError(
                    f"{type(self).__name__}: {what} the adapter (scale={scale}) would put non-finite "
                    f"values into the weight (lora_A or lora_B holds non-finite or too large "
                    f"values for {self.weight.dtype}); the weight is left unchanged")

    @torch.no_grad()
    def _write_delta(self, sign, scale):
        for rows, new in self._delta_chunks(sign, scale):
            rows.copy_(new)


def _enclosing_load(layer, prefix):
    """(model, whole state dict) of the ``nn.Module.load_state_dict`` call loading
    ``layer`` at ``prefix``: the innermost such call on the stack, whose model must hold
    ``layer`` under that name. None if there is none (a direct ``_load_from_state_dict``
    call, a loader of its own)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _LOAD_STATE_DICT_CODE:
        frame = frame.f_back
    if frame is None:
        return None
    model, whole_state_dict = frame.f_locals.get("self"), frame.f_locals.get("state_dict")
    del frame  # no reference cycle through this frame
    try:
        at_prefix = model.get_submodule(prefix[:-1])
    except AttributeError:
        return None
    return (model, whole_state_dict) if at_prefix is layer else None


def _refusals(layers, state_dict):
    """Why each of ``layers`` ([(prefix, LoRALayer)]) refuses its entries of
    ``state_dict``: a list of messages, each naming its layer."""
    refusals = []
    for prefix, layer in layers:
        try:
            layer._incoming_merged_state(state_dict, prefix)
        except ValueError as err:
            refusals.append(f"{type(layer).__name__} '{prefix[:-1]}': {err}")
        refusals += _tensor_refusals(layer, state_dict, prefix)
    return refusals


def _tensor_refusals(layer, state_dict, prefix):
    """torch's own refusals of a layer's parameter entries (not a tensor, another
    shape), found before any layer is written; the messages are torch's."""
    refusals = []
    for name, param in layer._parameters.items():
        key = prefix + name
        if param is None or key not in state_dict:
            continue
        incoming = state_dict[key]
        if not isinstance(incoming, torch.Tensor):
            refusals.append(f'While copying the parameter named "{key}", expected '
                            f'torch.Tensor or Tensor-like object from checkpoint but received '
                            f'{type(incoming)}')
        elif not is_lazy(param) and incoming.shape != param.shape:
            refusals.append(f"size mismatch for {key}: copying a param with shape "
                            f"{incoming.shape} from checkpoint, the shape in current model is "
                            f"{param.shape}.")
    return refusals
