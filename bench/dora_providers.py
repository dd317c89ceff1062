"""The providers of ``python -m bench.run --variant dora``: PEFT's DoRA Linear as
``LoraConfig(use_dora=True)`` builds it, lorakern's DoRA (``dora_linear``), lorakern's
LoRA and nn.Linear, on the same ``LayerInputs`` (adapters in the case's dtype; m
made per provider from the shared W, its norm as PEFT initialises it).
"""
from torch import nn

import lorakern
from lorakern.functional.dora import dora_linear_masked

from .cases import ALPHA_OVER_R
from .providers import PROVIDERS as LORA_PROVIDERS, Layer, Provider, _frozen_linear, _Holder


def _magnitude(t):
    return nn.Parameter(t.weight.float().norm(dim=1).to(t.lora_A.dtype))


def _reference(t, case, magnitude):
    """The fp32 DoRA output the forwards are checked against (dropout 0)."""
    f32 = [v.detach().float() for v in (t.x, t.weight, t.lora_A, t.lora_B, magnitude)]
    return lambda: dora_linear_masked(*f32, case.scale, None, None, 0.0)


def build_peft_dora(t, case):
    import peft
    config = peft.LoraConfig(r=case.rank, lora_alpha=ALPHA_OVER_R * case.rank,
                             lora_dropout=case.dropout, target_modules=["proj"],
                             use_dora=True)
    model = peft.get_peft_model(_Holder(_frozen_linear(t.weight)), config,
                                autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    layer.lora_A["default"].weight = nn.Parameter(t.lora_A)
    layer.lora_B["default"].weight = nn.Parameter(t.lora_B)
    magnitude = layer.lora_magnitude_vector["default"]
    magnitude.weight = _magnitude(t)
    return Layer(layer.train(), [layer.lora_A["default"].weight,
                                 layer.lora_B["default"].weight, magnitude.weight],
                 _reference(t, case, magnitude.weight))


def build_lorakern_dora(t, case):
    magnitude = _magnitude(t)
    return Layer(lambda x: lorakern.dora_linear(x, t.weight, t.lora_A, t.lora_B, magnitude,
                                                case.scale, None, case.dropout),
                 [t.lora_A, t.lora_B, magnitude], _reference(t, case, magnitude))


PROVIDERS = {p.name: p for p in [
    LORA_PROVIDERS["linear"],
    Provider("peft-dora", "PEFT DoRA Linear (use_dora=True), eager", build_peft_dora,
             requires=("peft",)),
    Provider("lorakern-dora", "lorakern.dora_linear, strategy chosen by its tuner",
             build_lorakern_dora, strategy="auto"),
    LORA_PROVIDERS["lorakern"],
]}
