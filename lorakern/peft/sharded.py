"""PEFT and lorakern models whose parameters are sharded across ranks.

Two engines shard parameters and gather them only around a module's forward
and backward, with hooks on the modules:

- FSDP2 (``torch.distributed.fsdp.fully_shard``): outside the forward each
  parameter is a DTensor shard; the hooks of the module ``fully_shard`` was
  applied to (a transformer block, the root) put the full plain tensors in
  place for its forward and backward. A PEFT LoRA layer inside such a module
  runs fused on those tensors: ``patch_peft`` accepts the shards at patch time,
  and the fused forward reads the plain tensors it finds at call time.
- DeepSpeed ZeRO-3: every module gets hooks that gather its own (direct)
  parameters. The fused forward of a PEFT LoRA layer reads its base layer's and
  adapters' parameters without calling those submodules, so ``patch_peft`` marks
  each patched layer as a ZeRO-3 leaf (DeepSpeed's ``_z3_leaf`` flag): DeepSpeed
  then hooks the layer alone and gathers all the parameters under it for its
  forward and backward. That takes effect when ``deepspeed.initialize`` registers
  its hooks, so ``patch_peft`` must run before it; after it, the base layers
  carry DeepSpeed's hooks and ``patch_peft`` refuses them, saying so.
  LoRA embeddings are not made leaves: a first layer's inputs (token ids) need
  no gradient, and DeepSpeed then releases a leaf's parameters before their
  gradients are accumulated. Under ZeRO-3 they run PEFT's forward (said once).

``save_adapter`` gathers FSDP2 shards with ``DTensor.full_tensor()``, a
collective: every rank calls it, rank 0 writes the files.

torch.distributed and deepspeed are read only when a model uses them.
"""
import sys

from torch import nn


def fsdp2_module_class():
    """``FSDPModule`` (the class ``fully_shard`` mixes into a module), or None."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None  # nothing can have been sharded by FSDP2 yet
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def unsharded_class(module):
    """The class of ``module`` before ``fully_shard`` replaced it by an ``FSDP<Name>``
    subclass (``type(module)`` for any other module)."""
    fsdp_module = fsdp2_module_class()
    cls = type(module)
    if fsdp_module is not None and isinstance(module, fsdp_module):
        return next(base for base in cls.__bases__ if base is not fsdp_module)
    return cls


def fsdp2_gathered_modules(model):
    """Ids of the modules of ``model`` whose parameters FSDP2 gathers for their forward:
    the modules ``fully_shard`` was applied to and everything under them."""
    fsdp_module = fsdp2_module_class()
    if fsdp_module is None:
        return set()
    return {id(m) for root in model.modules() if isinstance(root, fsdp_module)
            for m in root.modules()}


def is_dtensor(t):
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def _dtensor_class():
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def full_tensor(t):
    """``t`` itself, or the whole tensor of a DTensor shard (a collective call)."""
    return t.full_tensor() if is_dtensor(t) else t


def writes_files(tensors):
    """Whether this process writes a save whose values were gathered from ``tensors``:
    all do unless one was a DTensor, whose ranks all hold the same full value and
    only rank 0 writes."""
    import torch.distributed as dist
    return not any(is_dtensor(t) for t in tensors) or dist.get_rank() == 0


def wait_for_writer(tensors):
    """After a save of gathered DTensors: no rank returns before rank 0 has written."""
    if any(is_dtensor(t) for t in tensors):
        import torch.distributed as dist
        dist.barrier()


def mark_zero3_leaf(module):
    """Have DeepSpeed ZeRO-3 gather every parameter under ``module`` for its forward
    and backward (``deepspeed.utils.set_z3_leaf_module`` sets the same flag)."""
    module._z3_leaf = True


def unmark_zero3_leaf(module):
    """Undo ``mark_zero3_leaf`` unless DeepSpeed has registered the module already
    (its hooks were laid out for a leaf; removing the flag would leave the base
    layer's parameters ungathered)."""
    if not zero3_registered(module):
        vars(module).pop("_z3_leaf", None)


def hooked_base_advice(base):
    """What to do about a base layer whose forward hooks the fused call would bypass,
    when the hooks are FSDP2's or DeepSpeed's; empty otherwise."""
    fsdp_module = fsdp2_module_class()
    if fsdp_module is not None and isinstance(base, fsdp_module):
        return ("; fully_shard was applied to the base layer itself: apply it to a module "
                "above the LoRA layer (the transformer block or the whole model), whose "
                "hooks gather the base weight for the fused call")
    if zero3_registered(base):
        if isinstance(base, nn.Embedding):
            return ("; these are DeepSpeed ZeRO-3's hooks, and LoRA embeddings keep PEFT's "
                    "forward under ZeRO-3 (patch_peft(model, strict=False) fuses the rest)")
        return ("; these are DeepSpeed ZeRO-3's hooks: call patch_peft before "
                "deepspeed.initialize (or before the Trainer's DeepSpeed setup), so that "
                "DeepSpeed gathers the base weight around the patched layer")
    return ""


def zero3_registered(module):
    """Whether deepspeed.initialize has put its ZeRO-3 hooks on ``module``."""
    # modules get a ds_id there; parameters already get one from deepspeed.zero.Init
    return hasattr(module, "ds_id")

