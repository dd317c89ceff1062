"""PEFT and lorakern models sharded by FSDP2 across two CPU ranks (gloo).

``sharded_worker.py`` runs the ranks (one launch for all cases, the costly part);
here one process runs PEFT's own forward on the same model, on both ranks' ids,
and gives the reference: each rank's output, and the adapters' gradients of the
mean of the two ranks' losses (FSDP2 averages the ranks' gradients). Both sides
compute in float32 and differ in accumulation order only: assert_close of
test_peft_interop (1e-5 of the largest value).
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("safetensors")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp")

import sharded_worker as worker  # noqa: E402
from lorakern.peft import patch_peft, save_adapter, unpatch_peft  # noqa: E402
from test_peft_interop import assert_close, read_config, read_weights  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PATCHED = ["base_model.model.emb", "base_model.model.blocks.0.up",
           "base_model.model.blocks.0.down", "base_model.model.blocks.1.up",
           "base_model.model.blocks.1.down"]


def run_ranks(engine, out_dir):
    """Both ranks' results ({case: ...} per rank), from one launch of the worker."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "sharded_worker.py"), engine,
                           str(out_dir)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the ranks failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
            for rank in range(worker.WORLD)]


@pytest.fixture(scope="module")
def fsdp2_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp2")
    return out_dir, run_ranks("fsdp2", out_dir)


def single_process_reference():
    """PEFT's forward (not patched) on one process: each rank's output, and the
    adapters' gradients of the mean loss over the ranks."""
    model = worker.peft_model()
    outs = [model(worker.rank_ids(rank)) for rank in range(worker.WORLD)]
    loss = sum(worker.loss_of(out) for out in outs) / worker.WORLD
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "lora_" in name}
    return [out.detach() for out in outs], grads


def assert_matches_single_process(ranks, case, reference):
    outs, grads = reference
    for rank, result in enumerate(ranks):
        got = result[case]
        assert got["fused"] == PATCHED, f"rank {rank}: fused {got['fused']}"
        assert got["fused_calls"] == len(PATCHED), (
            f"rank {rank}: {got['fused_calls']} fused launches in the forward, "
            f"expected one per patched layer")
        assert_close(got["out"], outs[rank], f"rank {rank} output ({case})")
        # FSDP2 names a parameter as the unwrapped model does
        assert got["grads"].keys() == grads.keys(), sorted(got["grads"])
        for name, grad in grads.items():
            assert_close(got["grads"][name], grad, f"rank {rank} grad {name} ({case})")


@pytest.mark.parametrize("case", ["patch_after_shard", "patch_before_shard"])
def test_fsdp2_patched_peft_model_matches_one_process(fsdp2_ranks, case):
    _, ranks = fsdp2_ranks
    assert_matches_single_process(ranks, case, single_process_reference())


def test_fsdp2_on_the_base_layer_itself_is_refused_with_what_to_do(fsdp2_ranks):
    _, ranks = fsdp2_ranks
    for result in ranks:
        message = result["base_layer_sharded"]
        assert "'base_model.model.blocks.0.up'" in message, message
        assert "apply it to a module above the LoRA layer" in message, message


def test_fsdp2_save_adapter_writes_the_whole_adapter_once(fsdp2_ranks, tmp_path):
    out_dir, ranks = fsdp2_ranks
    saved = out_dir / "adapter"
    assert [r["saved_to"] for r in ranks] == [str(saved)] * worker.WORLD
    # rank 1 returned after rank 0 had written both files, and left no temporaries
    assert ranks[1]["saved_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    expected = save_adapter(worker.lorakern_model(), tmp_path / "one_process")
    assert read_config(saved) == read_config(expected)
    got, want = read_weights(saved), read_weights(expected)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the unsharded save"


def zero3_leaves(model):
    return sorted(name for name, m in model.named_modules() if vars(m).get("_z3_leaf"))


def test_patched_linear_layers_are_zero3_leaves_until_unpatched():
    """No DeepSpeed needed: the flag its hook registration reads, set and removed."""
    model = worker.peft_model()
    patch_peft(model)
    assert zero3_leaves(model) == sorted(PATCHED[1:]), "the linear layers, not the embedding"
    unpatch_peft(model)
    assert zero3_leaves(model) == []


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (an optional test dependency: DS_BUILD_OPS=0 pip install deepspeed)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero3_ranks(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out_dir = tmp_path_factory.mktemp("zero3")
    return run_ranks("zero3", out_dir)


def test_zero3_patch_before_initialize_matches_one_process(zero3_ranks):
    outs, grads = single_process_reference()
    for rank, result in enumerate(zero3_ranks):
        got = result["patch_before_initialize"]
        assert got["fused"] == PATCHED, f"rank {rank}: fused {got['fused']}"
        # the four linear layers fused; the embedding on PEFT's forward under ZeRO-3
        assert got["fused_calls"] == 4, f"rank {rank}: {got['fused_calls']} fused launches"
        assert_close(got["out"], outs[rank], f"rank {rank} output")
        assert got["grads"].keys() == grads.keys(), sorted(got["grads"])
        for name, grad in grads.items():
            assert_close(got["grads"][name], grad, f"rank {rank} grad {name}")


def test_zero3_patch_after_initialize_says_to_patch_before(zero3_ranks):
    for result in zero3_ranks:
        message = result["patch_after_initialize"]
        assert "nothing was patched" in message, message
        assert "call patch_peft before deepspeed.initialize" in message, message
        assert "LoRA embeddings keep PEFT's forward under ZeRO-3" in message, message
