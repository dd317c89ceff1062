"""``python -m lorakern.demo``: one fused LoRA layer, forward and backward,
checked against the PyTorch reference, and what each keeps for the backward.

On a machine without CUDA the Triton kernels run in Triton's interpreter.
"""
import os

import torch


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward of fn(), inputs excluded."""
    saved = {}

    def pack(t):
        saved[t.data_ptr(), t.numel()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def main():
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import lorakern
    from lorakern import function, kernels, reference

    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    tokens, d_in, d_out, rank, alpha, dropout = 64, 128, 96, 8, 16, 0.1
    scale = alpha / rank
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    weight = torch.randn(d_out, d_in, device=device) / d_in**0.5
    bias = torch.randn(d_out, device=device)
    lora_A = (torch.randn(rank, d_in, device=device) / d_in**0.5).requires_grad_()
    lora_B = (torch.randn(d_out, rank, device=device) * 0.1).requires_grad_()
    where = "CUDA (compiled kernels)" if on_gpu else "CPU (Triton interpreter)"
    print(f"lorakern {lorakern.__version__} on {where}")
    print(f"layer: {tokens} tokens, {d_in} -> {d_out}, r={rank}, alpha={alpha}, "
          f"dropout={dropout}, bias")

    seed = 1234
    function.draw_seed = lambda: seed  # fixed so the reference can use the same mask
    y, fused_saved = _saved_bytes(lambda: lorakern.lora_linear(
        x, weight, lora_A, lora_B, scale, bias, dropout))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    fused = (y.detach(), x.grad, lora_A.grad, lora_B.grad)
    print(f"kernels launched: {dict(kernels.launch_counts)}")

    keep = kernels.dropout_keep_mask(tokens, d_in, dropout, seed, device)
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    y_ref = reference.lora_linear_masked(leaves[0], weight.double(), leaves[1], leaves[2],
                                         scale, bias.double(), keep, dropout)
    y_ref.backward(grad_y.double())
    expected = (y_ref.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad)
    for name, got, want in zip(("y", "dX", "dA", "dB"), fused, expected):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        print(f"  {name:3s} max error vs float64 reference: {err:.1e} of max |value|")

    def composed():
        # the PEFT-style composition: base(x) + B(A(dropout(x))) * s
        dropped = torch.nn.functional.dropout(x, dropout)
        lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B)
        return torch.nn.functional.linear(x, weight, bias) + lora * scale

    _, composed_saved = _saved_bytes(composed)
    inputs = {(t.data_ptr(), t.numel()) for t in (x, weight, lora_A, lora_B)}
    for label, saved in (("fused", fused_saved), ("composed", composed_saved)):
        extra = sum(v for k, v in saved.items() if k not in inputs)
        print(f"saved for backward beyond the inputs, {label:8s}: {extra:6d} bytes")


if __name__ == "__main__":
    main()
