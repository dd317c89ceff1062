"""Bad input is refused with a message naming what is wrong, before any kernel runs."""
import re
import warnings

import pytest
import torch

import lorakern
from lorakern import kernels, reference
from lorakern.functional import dispatch

ENTRY_POINTS = {"fused": lorakern.lora_linear, "reference": reference.lora_linear}


def _good(device):
    return dict(x=torch.randn(4, 8, device=device), weight=torch.randn(7, 8, device=device),
                lora_A=torch.randn(3, 8, device=device), lora_B=torch.randn(7, 3, device=device),
                scale=1.0, bias=torch.randn(7, device=device), dropout_p=0.0)


BAD = [
    ("x_features", {"x": torch.randn(4, 9)}, ValueError, r"x of shape \(4, 9\).*weight of shape \(7, 8\)"),
    ("weight_1d", {"weight": torch.randn(8)}, ValueError, r"weight must be 2-D.*\(8,\)"),
    ("A_features", {"lora_A": torch.randn(3, 5)}, ValueError, r"lora_A must be \(r, in_features=8\).*\(3, 5\)"),
    ("B_rank", {"lora_B": torch.randn(7, 2)}, ValueError, r"lora_B must be \(out_features=7, r=3\).*\(7, 2\)"),
    ("B_out", {"lora_B": torch.randn(6, 3)}, ValueError, r"\(6, 3\)"),
    ("bias_shape", {"bias": torch.randn(6)}, ValueError, r"bias must be \(out_features=7,\).*\(6,\)"),
    ("rank_zero", {"lora_A": torch.randn(0, 8), "lora_B": torch.randn(7, 0)}, ValueError, r"r=0"),
    ("x_int", {"x": torch.ones(4, 8, dtype=torch.int64)}, TypeError, r"x has dtype torch.int64"),
    ("A_bool", {"lora_A": torch.ones(3, 8, dtype=torch.bool)}, TypeError, r"lora_A has dtype torch.bool"),
    ("x_not_tensor", {"x": [[1.0] * 8] * 4}, TypeError, r"x must be a torch.Tensor, got list"),
    ("dtype_mix", {"weight": torch.randn(7, 8, dtype=torch.float16)}, TypeError,
     r"x torch.float32, weight torch.float16"),
    ("devices", {"lora_B": torch.randn(7, 3, device="meta")}, ValueError,
     r"one device.*lora_B on meta"),
    ("p_negative", {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    ("p_one", {"dropout_p": 1.0}, ValueError, r"got 1.0"),
    ("scale_nan", {"scale": float("nan")}, ValueError, r"scale must be finite, got nan"),
    ("scale_inf", {"scale": float("inf")}, ValueError, r"scale must be finite, got inf"),
    ("scale_str", {"scale": "2"}, TypeError, r"scale must be a real number, got str"),
    ("scale_requires_grad", {"scale": torch.tensor(2.0, requires_grad=True)}, TypeError,
     r"scale is a tensor that requires grad.*computes no gradient for it"),
    ("scale_vector", {"scale": torch.ones(2)}, TypeError, r"scale must be .*shape \(2,\)"),
    ("p_requires_grad", {"dropout_p": torch.tensor(0.1, requires_grad=True)}, TypeError,
     r"dropout_p is a tensor that requires grad"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name,changes,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_named_error_before_any_kernel(entry, name, changes, error, message):
    args = _good("cpu")
    args.update(changes)
    before = sum(kernels.launch_counts.values())
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**args)
    assert sum(kernels.launch_counts.values()) == before


def test_an_unknown_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "cuBLAS")
    with pytest.raises(ValueError, match=re.escape("LORAKERN_BACKEND='cublas'")):
        lorakern.lora_linear(**_good("cpu"))


def test_float64_takes_the_reference_and_says_so_once(device, monkeypatch):
    """float64 reaches the kernels' device (CUDA, or CPU under the interpreter),
    which the kernels do not serve: the reference runs, with one warning."""
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_said", set())
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _good(device).items()}
    before = sum(kernels.launch_counts.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakern.lora_linear(**args)
        lorakern.lora_linear(**args)
    messages = [str(w.message) for w in caught if "lorakern" in str(w.message)]
    assert len(messages) == 1 and "torch.float64" in messages[0], messages
    assert sum(kernels.launch_counts.values()) == before


def test_float64_with_the_triton_backend_forced_is_an_error(monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "triton")
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _good("cpu").items()}
    with pytest.raises(TypeError, match="float64"):
        lorakern.lora_linear(**args)


def _run_fresh_process(script, **env_changes):
    """(returncode, stdout, stderr) of ``python -c script`` with no TRITON_INTERPRET and
    no GPU, as a user would start it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", **env_changes)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout.strip(), done.stderr[-3000:]


BACKEND_TRITON_SCRIPT = (
    "import torch, lorakern\n"
    "x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)\n"
    "a.requires_grad_()\n"
    "y = lorakern.lora_linear(x, w, a, b, 0.5, None, 0.25)\n"
    "y.sum().backward()\n"
    "y = lorakern.lora_linear(x, w, a, b, 0.5)\n"
    "ref = lorakern.reference.lora_linear(x, w, a, b, 0.5)\n"
    "from lorakern import kernels\n"
    "assert kernels.launch_counts['lora_forward'] == 2, kernels.launch_counts\n"
    "assert kernels.launch_counts['tn_matmul'] >= 1, kernels.launch_counts\n"
    "assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)\n"
    "print('ok')\n")


@pytest.mark.parametrize("imported_first", ["", "triton", "peft"])
def test_backend_triton_runs_cpu_tensors_in_the_interpreter_without_setup(imported_first):
    """LORAKERN_BACKEND=triton alone (no TRITON_INTERPRET) sends CPU tensors
    through the kernels, also when triton (or peft, which imports it) was imported
    before lorakern had switched the interpreter on."""
    script = (f"import {imported_first}\n" if imported_first else "") + BACKEND_TRITON_SCRIPT
    returncode, stdout, stderr = _run_fresh_process(script, LORAKERN_BACKEND="triton")
    assert returncode == 0 and stdout == "ok", stderr
