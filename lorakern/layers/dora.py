"""``DoRALinear``: ``LoRALinear`` with PEFT's DoRA (``use_dora=True``).

    y = (m / ||W + s B A||_row) * (x W^T + s (x A^T) B^T) + b        (eval, or no dropout)

with the trainable magnitude ``lora_magnitude`` m (out,) beside lora_A and lora_B,
and, in training with dropout, PEFT's second product on drop(x) (see
``lorakern.functional.dora``). ``LoRALinear(..., use_dora=True)`` and
``LoRALinear.from_linear(..., use_dora=True)`` build one.

m starts as ||W + s B A|| per output feature (B is zero: ||W||), as PEFT's
``DoraLinearLayer.update_layer`` sets it, in the adapters' dtype.

Merging writes ``(m / n) * (W + s B A)`` into the weight, n = ||W + s B A|| of the
unmerged weight, in float32 in blocks of stored rows (no out x in temporary);
n is kept to unmerge: ``W = merged / (m / n) - s B A``. The kept n is not in the
state dict, so a layer loaded merged cannot be unmerged (refused, by name).
"""
import torch

from ..functional.dora import dense_weight_norm_chunked, dora_linear
from .adapter import MERGE_CHUNK_ROWS
from .linear import LoRALinear


class DoRALinear(LoRALinear):
    """A LoRALinear whose adapter is DoRA; attributes as LoRALinear's plus
    ``lora_magnitude`` (out,) and ``use_dora`` (True)."""

    use_dora = True

    def _add_adapters(self):
        super()._add_adapters()
        self.lora_magnitude = torch.nn.Parameter(self.adapter_norm())

    def adapter_norm(self):
        """||W + s B A|| per output feature, fp32 at least, in the adapters' dtype."""
        return dense_weight_norm_chunked(self._weight_out_in(), self.lora_A, self.lora_B,
                                         self.scale).to(self.lora_A.dtype)

    def reset_lora_parameters(self):
        super().reset_lora_parameters()
        if "lora_magnitude" in self._parameters:
            with torch.no_grad():
                self.lora_magnitude.copy_(self.adapter_norm())

    def forward(self, x):
        weight = self._weight_out_in()
        if self._merged:
            return torch.nn.functional.linear(x, weight, self.bias)
        return dora_linear(x, weight, self.lora_A, self.lora_B, self.lora_magnitude,
                           self.scale, self.bias, self.dropout if self.training else 0.0)

    # ------------------------------------------------------------------ merging
    def _apply_delta(self, sign, check=True):
        norm = self._norm_for(sign)
        super()._apply_delta(sign, check)
        self._merge_norm = norm if sign > 0 else None

    def _norm_for(self, sign):
        """n of the unmerged weight: taken now to merge, the one kept at merge to unmerge."""
        if sign > 0:
            return self.adapter_norm()
        norm = getattr(self, "_merge_norm", None)
        if norm is None:
            raise RuntimeError(f"{type(self).__name__}.unmerge: this DoRA layer was loaded "
                               f"merged; the norm of its unmerged weight is not in the state "
                               f"dict, so it cannot be unmerged")
        return norm

    def _delta_chunks(self, sign, scale):
        """Yields (stored weight rows, their merged or unmerged values in the weight's
        dtype), in float32 (at least) per block of MERGE_CHUNK_ROWS stored rows: merged
        ``g * (W + s B A)``, unmerged ``merged / g - s B A``, g = m / n per output
        feature (a stored column when fan_in_fan_out)."""
        weight = self.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        a = self.lora_A.detach().to(weight.device, compute)
        b = self.lora_B.detach().to(weight.device, compute)
        factor = (self.lora_magnitude.detach().to(weight.device, compute)
                  / self._norm_for(sign).to(weight.device, compute))
        step = max(1, int(MERGE_CHUNK_ROWS))
        for start in range(0, weight.shape[0], step):
            stop = min(start + step, weight.shape[0])
            if self.fan_in_fan_out:
                delta, g = a[:, start:stop].t() @ b.t(), factor[None, :]
            else:
                delta, g = b[start:stop] @ a, factor[start:stop, None]
            delta.mul_(scale)
            rows = weight[start:stop].to(compute)
            new = (rows + delta) * g if sign > 0 else rows / g - delta
            yield weight[start:stop], new.to(weight.dtype)

    def extra_repr(self):
        return super().extra_repr() + ", use_dora=True"


LoRALinear.dora_class = DoRALinear
