"""torch.compile sees the fused layer as one custom op; checkpointing replays
its dropout exactly."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lorakern
from lorakern.functional.ops import lora_linear_backward_op, lora_linear_op
from oracle import assert_matches_oracle


class TwoLoRALayers(torch.nn.Module):
    def __init__(self, d_in=16, d_hidden=24, d_out=12, r=3, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.w1 = torch.nn.Parameter(torch.randn(d_hidden, d_in) / d_in**0.5, requires_grad=False)
        self.b1 = torch.nn.Parameter(torch.randn(d_hidden), requires_grad=False)
        self.a1 = torch.nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.B1 = torch.nn.Parameter(torch.randn(d_hidden, r))
        self.w2 = torch.nn.Parameter(torch.randn(d_out, d_hidden) / d_hidden**0.5,
                                     requires_grad=False)
        self.a2 = torch.nn.Parameter(torch.randn(r, d_hidden) / d_hidden**0.5)
        self.B2 = torch.nn.Parameter(torch.randn(d_out, r))

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        h = torch.relu(lorakern.lora_linear(x, self.w1, self.a1, self.B1, 2.0, self.b1, p))
        return lorakern.lora_linear(h, self.w2, self.a2, self.B2, 2.0, None, p)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fullgraph_compile_matches_eager_forward_and_backward(device):
    torch.manual_seed(0)
    model = TwoLoRALayers().to(device)
    x = torch.randn(2, 7, 16, device=device, requires_grad=True)
    y_eager = model(x)
    y_eager.square().sum().backward()
    eager_grads, eager_dx = _grads(model), x.grad.clone()
    model.zero_grad()
    x.grad = None

    compiled = torch.compile(model, fullgraph=True)  # a graph break is an error
    y = compiled(x)
    y.square().sum().backward()
    assert_matches_oracle(y.detach().cpu(), y_eager.detach().double().cpu(), torch.float32, "y")
    assert_matches_oracle(x.grad.cpu(), eager_dx.double().cpu(), torch.float32, "dx")
    grads = _grads(model)
    assert grads.keys() == eager_grads.keys() == {"a1", "B1", "a2", "B2"}
    for name, grad in grads.items():
        assert_matches_oracle(grad.cpu(), eager_grads[name].double().cpu(), torch.float32, name)


def test_fullgraph_compile_runs_dropout_in_training(device):
    torch.manual_seed(1)
    model = TwoLoRALayers(dropout=0.5).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16, device=device)
    first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second), "dropout did not draw a new mask"
    first.sum().backward()
    assert model.a1.grad is not None and torch.isfinite(model.a1.grad).all()
    model.eval()
    assert torch.equal(compiled(x), model(x))


def test_custom_ops_pass_torch_library_opcheck(device):
    torch.manual_seed(2)
    x = torch.randn(6, 10, device=device, requires_grad=True)
    weight = torch.randn(8, 10, device=device)
    lora_A = torch.randn(3, 10, device=device, requires_grad=True)
    lora_B = torch.randn(8, 3, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    seed = torch.tensor([7])
    torch.library.opcheck(lora_linear_op, (x, weight, lora_A, lora_B, bias, 0.5, 0.25, seed))
    y, h = lora_linear_op(x.detach(), weight, lora_A.detach(), lora_B.detach(), bias.detach(),
                          0.5, 0.25, seed)
    torch.library.opcheck(lora_linear_backward_op,
                          (torch.randn_like(y), x.detach(), weight, lora_A.detach(),
                           lora_B.detach(), h, 0.5, 0.25, seed, [True, False, True, True, True]))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_gives_the_same_gradients_with_dropout(use_reentrant, device):
    torch.manual_seed(3)
    model = TwoLoRALayers(dropout=0.3).to(device)
    x = torch.randn(4, 6, 16, device=device, requires_grad=True)

    torch.manual_seed(10)
    model(x).square().sum().backward()
    plain, plain_dx = _grads(model), x.grad.clone()
    model.zero_grad()
    x.grad = None

    torch.manual_seed(10)
    checkpoint(model, x, use_reentrant=use_reentrant).square().sum().backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, plain[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(x.grad, plain_dx, rtol=0, atol=0)


def test_fullgraph_compile_of_a_model_with_lora_linear_layers(device):
    """The module users put in their models, compiled whole: no graph break,
    same output and adapter gradients as eager."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(lorakern.LoRALinear(16, 24, r=3, alpha=6), torch.nn.GELU(),
                                lorakern.LoRALinear(24, 8, r=5, alpha=5, bias=False))
    model = model.to(device)
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16, device=device)
    model(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    assert_matches_oracle(y.detach().cpu(), model(x).detach().double().cpu(), torch.float32, "y")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager.keys() == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    for name, grad in grads.items():
        assert_matches_oracle(grad.cpu(), eager[name].double().cpu(), torch.float32, name)


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_one_compiled_graph_serves_every_token_count(dynamic, device):
    """Variable sequence lengths are the normal case in training: after the first
    recompile makes M symbolic, no new token count compiles again (and the
    fullgraph recompile limit is never hit)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(5)
    layer = lorakern.LoRALinear(16, 8, r=3, alpha=6).to(device)
    torch.nn.init.normal_(layer.lora_B)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter, dynamic=dynamic)
    compiles_after_two = None
    for index, seq in enumerate((3, 4, 5, 7, 9, 12, 16, 17, 23, 31, 40, 64)):
        if index == 2:
            compiles_after_two = counter.frame_count
        x = torch.randn(2, seq, 16, device=device)
        y = compiled(x)
        y.square().sum().backward()
        assert_matches_oracle(y.detach().cpu(), layer(x).detach().double().cpu(),
                              torch.float32, f"y at {seq} tokens")
    assert counter.frame_count == compiles_after_two, (
        f"{counter.frame_count - compiles_after_two} recompiles after the second token count")


def test_fullgraph_compile_of_a_model_with_a_lora_embedding(device):
    """One custom op per LoRAEmbedding: no graph break, the eager output and adapter
    gradients, no recompile for new token counts, and an out-of-range id still refused."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(6)
    model = torch.nn.Sequential(lorakern.LoRAEmbedding(40, 12, r=3, alpha=6, padding_idx=0),
                                torch.nn.Linear(12, 5)).to(device)
    torch.nn.init.normal_(model[0].lora_A)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    compiles_after_two = None
    for index, seq in enumerate((3, 5, 8, 13, 21)):
        if index == 2:
            compiles_after_two = counter.frame_count
        ids = torch.randint(0, 40, (2, seq), device=device)
        model.zero_grad()
        model(ids).square().sum().backward()
        eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        y = compiled(ids)
        y.square().sum().backward()
        assert_matches_oracle(y.detach().cpu(), model(ids).detach().double().cpu(),
                              torch.float32, f"y at {seq} tokens")
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == eager.keys() and "0.lora_A" in grads
        for name, grad in grads.items():
            assert_matches_oracle(grad.cpu(), eager[name].double().cpu(), torch.float32, name)
    assert counter.frame_count == compiles_after_two
    with pytest.raises(ValueError, match="token id 40 is out of range"):
        compiled(torch.tensor([[1, 40]], device=device))


def test_the_embedding_custom_ops_pass_torch_library_opcheck(device):
    from lorakern.functional.ops import lora_embedding_backward_op, lora_embedding_op
    torch.manual_seed(7)
    ids = torch.randint(0, 9, (3, 4), device=device)
    weight = torch.randn(9, 6, device=device)
    lora_A = torch.randn(2, 9, device=device, requires_grad=True)
    lora_B = torch.randn(6, 2, device=device, requires_grad=True)
    torch.library.opcheck(lora_embedding_op, (ids, weight, lora_A, lora_B, 0.5, 0))
    torch.library.opcheck(lora_embedding_backward_op,
                          (torch.randn(3, 4, 6, device=device), ids, weight, lora_A.detach(),
                           lora_B.detach(), 0.5, 0, [False, True, True]))
