"""Two CPU ranks (gloo) running a tiny model under FSDP2 or DeepSpeed ZeRO-3.

``python tests/sharded_worker.py ENGINE OUT_DIR`` spawns the ranks; each writes
``OUT_DIR/rank<i>.pt``: per case, the fused layers' count, the output for that
rank's ids, and the whole gradient of every adapter parameter (gathered). The
tests (test_sharded.py) compare them with one process running PEFT's own
forward on the same model and both ranks' ids. Not a test module itself.
"""
import os
import sys

import torch
from torch import nn

# the lorakern of this checkout, not an installed one
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB, DIM, HIDDEN = 11, 12, 20
TARGETS = ["emb", "up", "down"]
WORLD = 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


class Tiny(nn.Module):
    """An embedding and two blocks: LoRA on nn.Embedding and on nn.Linear, with and
    without bias, each block a natural unit for fully_shard."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return h


def base_model():
    torch.manual_seed(0)
    return Tiny()


def randomize_adapters(model):
    """Every LoRA parameter random (B nonzero), the same on every rank."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def peft_model():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(base_model(), LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS))
    randomize_adapters(model)
    return model


def lorakern_model():
    from lorakern.models import inject_lora
    model = inject_lora(base_model(), TARGETS, r=3, alpha=5)
    randomize_adapters(model)
    return model


def rank_ids(rank):
    return torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(40 + rank))


def loss_of(out):
    return out.square().mean()


def adapter_grads(model):
    """{name: whole gradient} of the adapter parameters (names without FSDP's or
    DeepSpeed's wrappers)."""
    return {name: _whole_grad(p) for name, p in model.named_parameters() if "lora_" in name}


def _whole_grad(param):
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_grad
        return safe_get_full_grad(param).detach().clone()
    grad = param.grad
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()


def step(model, rank):
    """Output for this rank's ids and the adapters' gradients of the mean loss over
    both ranks (FSDP2 and ZeRO-3 average the ranks' gradients)."""
    from lorakern import kernels
    launches = kernels.launch_counts["lora_forward"] + kernels.launch_counts["lora_embedding_forward"]
    out = model(rank_ids(rank))
    fused_calls = (kernels.launch_counts["lora_forward"]
                   + kernels.launch_counts["lora_embedding_forward"] - launches)
    return out, fused_calls


def fsdp2_cases(rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    from lorakern.peft import patch_peft, patched_modules, save_adapter

    def shard(model, blocks):
        for block in blocks:
            fully_shard(block)
        fully_shard(model)

    results = {}
    for order in ("patch_after_shard", "patch_before_shard"):
        model = peft_model()
        if order == "patch_before_shard":
            patch_peft(model)
        shard(model, model.base_model.model.blocks)
        if order == "patch_after_shard":
            patch_peft(model)
        out, fused_calls = step(model, rank)
        loss_of(out).backward()
        results[order] = {"fused": patched_modules(model), "fused_calls": fused_calls,
                          "out": out.detach().clone(), "grads": adapter_grads(model)}

    model = peft_model()
    fully_shard(model.base_model.model.blocks[0].up.base_layer)
    fully_shard(model)
    try:
        patch_peft(model)
        results["base_layer_sharded"] = "patched"
    except ValueError as exc:
        results["base_layer_sharded"] = str(exc)

    model = lorakern_model()
    shard(model, model.blocks)
    results["saved_to"] = save_adapter(model, os.path.join(out_dir, "adapter"))
    results["saved_files"] = sorted(os.listdir(os.path.join(out_dir, "adapter")))
    return results


def zero3_config():
    return {"train_batch_size": WORLD, "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}


def zero3_cases(rank, out_dir):
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 (deepspeed.comm.torch is the torch package)
    # its shared-memory all-reduce is a C++ extension compiled on first use (a minute on
    # two cores); gloo does the same reductions for a tiny model
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

    from lorakern.peft import patch_peft, patched_modules

    results = {}
    model = peft_model()
    patch_peft(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=zero3_config())
    out, fused_calls = step(engine, rank)
    engine.backward(loss_of(out))
    results["patch_before_initialize"] = {"fused": patched_modules(model),
                                          "fused_calls": fused_calls,
                                          "out": out.detach().clone(),
                                          "grads": adapter_grads(model)}

    model = peft_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=zero3_config())
    try:
        patch_peft(model)
        results["patch_after_initialize"] = "patched"
    except ValueError as exc:
        results["patch_after_initialize"] = str(exc)
    return results


def run_rank(rank, engine, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"),
                            rank=rank, world_size=WORLD)
    try:
        cases = fsdp2_cases if engine == "fsdp2" else zero3_cases
        torch.save(cases(rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(engine, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the kernels run in the interpreter
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.multiprocessing.spawn(run_rank, args=(engine, out_dir), nprocs=WORLD)


if __name__ == "__main__":
    main(*sys.argv[1:])
