"""The fused LoRA embedding against the float64 oracle, through ``lorakern.lora_embedding``.

On a machine without CUDA the kernels run in Triton's interpreter (see conftest).
"""
import pytest
import torch

import lorakern
from lorakern import kernels
from lorakern.reference import lora_embedding as reference_lora_embedding
from oracle import assert_matches_oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_embedding(vocab, dim, r, dtype, device, *, adapter_dtype=None, train_table=False):
    adapter_dtype = adapter_dtype or dtype
    return {
        "weight": torch.randn(vocab, dim, dtype=dtype, device=device).requires_grad_(train_table),
        "lora_A": torch.randn(r, vocab, device=device).to(adapter_dtype).requires_grad_(),
        "lora_B": torch.randn(dim, r, device=device).to(adapter_dtype).requires_grad_(),
    }


def embedding_oracle(ids, layer, scale, padding_idx, grad_y):
    """y and the gradients of every float input, in float64 on the CPU."""
    leaves = {k: v.detach().cpu().double().requires_grad_(v.requires_grad)
              for k, v in layer.items()}
    y = reference_lora_embedding(ids.cpu(), leaves["weight"], leaves["lora_A"],
                                 leaves["lora_B"], scale, padding_idx)
    y.backward(grad_y.detach().cpu().double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def run_and_check(ids, layer, scale, padding_idx, compute_dtype):
    launches = kernels.launch_counts["lora_embedding_forward"]
    y = lorakern.lora_embedding(ids, layer["weight"], layer["lora_A"], layer["lora_B"], scale,
                                padding_idx)
    assert kernels.launch_counts["lora_embedding_forward"] == launches + (1 if y.numel() else 0)
    assert y.shape == (*ids.shape, layer["weight"].shape[1])
    assert y.dtype == layer["weight"].dtype
    grad_y = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(grad_y)
    y_ref, grads = embedding_oracle(ids, layer, scale, padding_idx, grad_y)
    assert_matches_oracle(y.detach().cpu(), y_ref, compute_dtype, "y")
    for name, tensor in layer.items():
        if tensor.requires_grad:
            assert tensor.grad is not None and tensor.grad.dtype == tensor.dtype, name
            assert_matches_oracle(tensor.grad.cpu(), grads[name], compute_dtype, f"d{name}")
        else:
            assert tensor.grad is None, name


# (ids shape, vocab, dim, r, padding_idx): repeated ids everywhere (vocab < tokens),
# 1-D/2-D/3-D ids, ranks 1/3/16/20, odd dims, a padding id that occurs and one that doesn't
CASES = [
    ((37,), 11, 19, 1, None),
    ((4, 9), 23, 40, 3, 0),
    ((2, 3, 5), 7, 33, 16, 6),
    ((50,), 64, 17, 20, -1),
    ((6, 6), 300, 8, 3, 299),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("shape,vocab,dim,r,padding_idx", CASES, ids=str)
def test_output_and_every_gradient_match_the_float64_oracle(shape, vocab, dim, r, padding_idx,
                                                            id_dtype, dtype, device):
    torch.manual_seed(hash((shape, vocab, dim, r)) % 2**31)
    ids = torch.randint(0, vocab, shape, device=device, dtype=id_dtype)
    if padding_idx is not None:
        ids.view(-1)[::4] = padding_idx % vocab
    layer = make_embedding(vocab, dim, r, dtype, device)
    run_and_check(ids, layer, 0.5, padding_idx, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_on_a_half_table_compute_in_fp32(dtype, device):
    """PEFT's default: y in the table's dtype, A and B grads in fp32. The rank
    product is not rounded to the table's dtype: large values that overflow fp16
    inside the adapter branch still give the finite fp32 answer."""
    torch.manual_seed(1)
    ids = torch.randint(0, 30, (3, 7), device=device)
    layer = make_embedding(30, 24, 5, dtype, device, adapter_dtype=torch.float32)
    run_and_check(ids, layer, 2.0, None, dtype)


def test_a_trainable_table_gets_its_gradient_without_the_padding_row(device):
    torch.manual_seed(2)
    ids = torch.tensor([[1, 2, 2, 0], [5, 0, 2, 7]], device=device)
    layer = make_embedding(9, 12, 4, torch.float32, device, train_table=True)
    run_and_check(ids, layer, 1.5, 0, torch.float32)
    assert torch.all(layer["weight"].grad[0] == 0) and torch.all(layer["lora_A"].grad[:, 0] == 0)
    unused = [3, 4, 6, 8]
    assert torch.all(layer["weight"].grad[unused] == 0)
    assert torch.all(layer["lora_A"].grad[:, unused] == 0)


def test_gradients_are_the_same_on_every_run(device):
    """Sums per id run in a fixed order: no run-to-run differences."""
    torch.manual_seed(3)
    ids = torch.randint(0, 5, (200,), device=device)
    layer = make_embedding(5, 16, 3, torch.float32, device)
    grads = []
    for _ in range(2):
        for t in layer.values():
            t.grad = None
        lorakern.lora_embedding(ids, layer["weight"], layer["lora_A"], layer["lora_B"],
                                0.7).square().sum().backward()
        grads.append((layer["lora_A"].grad.clone(), layer["lora_B"].grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))


def test_no_ids_give_an_empty_output_and_zero_gradients(device):
    layer = make_embedding(6, 8, 2, torch.float32, device)
    ids = torch.zeros(0, 3, dtype=torch.int64, device=device)
    y = lorakern.lora_embedding(ids, layer["weight"], layer["lora_A"], layer["lora_B"], 1.0)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.all(layer["lora_A"].grad == 0) and torch.all(layer["lora_B"].grad == 0)


@pytest.mark.parametrize("bad_id", [-1, 6])
def test_an_out_of_range_id_is_refused_before_any_kernel(bad_id, device):
    layer = make_embedding(6, 8, 2, torch.float32, device)
    ids = torch.tensor([0, bad_id, 2], device=device)
    before = sum(kernels.launch_counts.values())
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of range.*num_embeddings=6"):
        lorakern.lora_embedding(ids, layer["weight"], layer["lora_A"], layer["lora_B"])
    assert sum(kernels.launch_counts.values()) == before


@pytest.mark.parametrize("changes,error,message", [
    ({"ids": torch.zeros(3)}, TypeError, r"ids has dtype torch.float32"),
    ({"lora_A": torch.randn(2, 5)}, ValueError, r"lora_A must be \(r >= 1, num_embeddings=6\)"),
    ({"lora_B": torch.randn(8, 3)}, ValueError, r"lora_B must be \(embedding_dim=8, r=2\)"),
    ({"weight": torch.randn(6)}, ValueError, r"weight must be 2-D"),
    ({"padding_idx": 6}, ValueError, r"padding_idx=6 is outside"),
])
def test_bad_input_is_refused_by_name(changes, error, message):
    args = dict(ids=torch.tensor([0, 1]), weight=torch.randn(6, 8), lora_A=torch.randn(2, 6),
                lora_B=torch.randn(8, 2), scale=1.0, padding_idx=None)
    args.update(changes)
    with pytest.raises(error, match=message):
        lorakern.lora_embedding(**args)


# ---------------------------------------------------------------- LoRAEmbedding
def _trained(layer):
    """Adapters away from PEFT's init (A = 0), as after some training."""
    with torch.no_grad():
        layer.lora_A.normal_()
    return layer


def test_a_new_layer_computes_the_base_embedding(device):
    torch.manual_seed(4)
    base = torch.nn.Embedding(20, 12, padding_idx=3, device=device)
    layer = lorakern.LoRAEmbedding.from_embedding(base, r=4, alpha=8)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert torch.all(layer.lora_A == 0) and layer.lora_B.std() > 0.5  # PEFT: A zeros, B normal
    ids = torch.randint(0, 20, (3, 5), device=device)
    assert torch.equal(layer(ids), base(ids))
    assert layer.scale == 2.0 and layer.padding_idx == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_output_and_gradients_match_the_oracle(dtype, device):
    torch.manual_seed(5)
    layer = _trained(lorakern.LoRAEmbedding(15, 10, r=3, alpha=6, padding_idx=1,
                                            device=device, dtype=dtype))
    assert layer.lora_A.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    ids = torch.randint(0, 15, (4, 6), device=device)
    tensors = {"weight": layer.weight, "lora_A": layer.lora_A, "lora_B": layer.lora_B}
    y = layer(ids)
    grad_y = torch.randn(y.shape, device=device).to(y.dtype)
    y.backward(grad_y)
    y_ref, grads = embedding_oracle(ids, tensors, layer.scale, 1, grad_y)
    assert_matches_oracle(y.detach().cpu(), y_ref, dtype, "y")
    for name in ("lora_A", "lora_B"):
        assert_matches_oracle(tensors[name].grad.cpu(), grads[name], dtype, f"d{name}")


def test_merge_and_unmerge_keep_the_output_and_survive_the_state_dict(device):
    torch.manual_seed(6)
    layer = _trained(lorakern.LoRAEmbedding(30, 8, r=2, alpha=4, device=device))
    ids = torch.randint(0, 30, (2, 9), device=device)
    before = layer(ids).detach()
    lorakern.merge_lora(torch.nn.Sequential(layer))
    assert layer.merged
    torch.testing.assert_close(layer(ids), before, rtol=1e-5, atol=1e-5)
    fresh = lorakern.LoRAEmbedding(30, 8, r=2, alpha=4, device=device)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    torch.testing.assert_close(fresh(ids), before, rtol=1e-5, atol=1e-5)
    fresh.unmerge()
    torch.testing.assert_close(fresh(ids), before, rtol=1e-5, atol=1e-5)


def test_max_norm_renormalises_the_table_as_nn_embedding_does(device):
    torch.manual_seed(7)
    base = torch.nn.Embedding(12, 6, max_norm=1.0, device=device)
    twin = torch.nn.Embedding(12, 6, max_norm=1.0, device=device)
    twin.weight.data.copy_(base.weight.data)
    layer = lorakern.LoRAEmbedding.from_embedding(base, r=2, alpha=2)
    ids = torch.tensor([[0, 4, 4, 7]], device=device)
    torch.testing.assert_close(layer(ids), twin(ids))
    torch.testing.assert_close(base.weight, twin.weight)
    assert base.weight[[0, 4, 7]].norm(dim=1).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("module,message", [
    (torch.nn.Embedding(5, 4, sparse=True), "sparse=True"),
    (torch.nn.Embedding(5, 4, scale_grad_by_freq=True), "scale_grad_by_freq=True"),
    (torch.nn.Linear(5, 4), "takes an nn.Embedding, got Linear"),
])
def test_from_embedding_refuses_what_it_cannot_reproduce(module, message):
    with pytest.raises(TypeError, match=message):
        lorakern.LoRAEmbedding.from_embedding(module)


def test_repr_names_the_shape_rank_and_padding():
    layer = lorakern.LoRAEmbedding(100, 16, r=4, alpha=8, padding_idx=0)
    assert repr(layer) == ("LoRAEmbedding(100, 16, r=4, alpha=8, scale=2, padding_idx=0, "
                           "merged=False)")
