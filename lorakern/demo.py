"""``python -m lorakern.demo``: the seed experiment.

A linear map y = x θ (1001 inputs, 1000 outputs) is learnt by a full-rank
layer; then the task shifts to y = x (θ + 1). Fine-tuning only a rank-1 LoRA
adapter on the frozen layer recovers the shift, because the shift, a matrix of
ones, has rank 1: s·B·A should come out as that matrix. The adapter is then
merged into the weight and the model keeps its loss.

On CUDA the layer runs lorakern's Triton kernels; on CPU, its PyTorch
reference (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter,
slowly).
"""
import torch
from torch import nn

import lorakern

D_IN, D_OUT, SAMPLES, BATCH, STEPS = 1001, 1000, 4096, 256, 300


class Regressor(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT, bias=False, device=device)

    def forward(self, x):
        return self.proj(x)


def mse(model, x, y):
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    theta = torch.randn(D_IN, D_OUT, device=device) / D_IN**0.5
    x = torch.randn(SAMPLES, D_IN, device=device)
    model = Regressor(device)

    print(f"1. pretrain a full-rank {D_IN} -> {D_OUT} linear on y = x θ ({SAMPLES} samples)")
    with torch.no_grad():  # least squares: the pretrained optimum in one step
        model.proj.weight.copy_(torch.linalg.lstsq(x.cpu(), (x @ theta).cpu()).solution.T)
    print(f"   loss on y = x θ:       {mse(model, x, x @ theta):.3e}")
    y_new = x @ (theta + 1)
    print(f"   loss on y = x (θ + 1): {mse(model, x, y_new):.3e}   <- the task has shifted")

    print("2. freeze it and fine-tune a rank-1 LoRA adapter (lorakern.inject_lora)")
    lorakern.inject_lora(model, ["proj"], r=1, alpha=1)
    layer = model.proj
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(STEPS + 1):
        batch = torch.randint(0, SAMPLES, (BATCH,), device=device)
        loss = nn.functional.mse_loss(model(x[batch]), y_new[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"   step {step:3d}  loss {loss.item():.3e}")

    with torch.no_grad():
        delta = layer.scale * layer.lora_B.float() @ layer.lora_A.float()
    error = ((delta - 1).norm() / torch.ones_like(delta).norm()).item()
    print(f"3. s·B·A is the shift: mean {delta.mean().item():.4f}, min {delta.min().item():.4f}, "
          f"max {delta.max().item():.4f}, ||s·B·A - 1|| / ||1|| = {error:.1e}")

    lorakern.merge_lora(model)
    print(f"4. merged into W: loss on y = x (θ + 1) {mse(model, x, y_new):.3e} "
          f"(merged={layer.merged})")
    print("5. parameters")
    lorakern.lora_report(model)


if __name__ == "__main__":
    main()
