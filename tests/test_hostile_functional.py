"""Edge cases of the functional calls: scales at the edge of the compute dtype, mixed
adapter dtypes in the embedding kernels, tensor scalars under torch.compile, float64
under autocast, the interpreter switch and the declared dependencies.

On a machine without CUDA the kernels run in Triton's interpreter (see conftest).
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import lorakern
from lorakern import kernels, reference
from oracle import assert_matches_oracle
from test_packaging import setup_install_requires

FLOAT32_MAX = torch.finfo(torch.float32).max
# the smallest magnitude that rounds to infinity in float32: halfway between its
# largest finite value and 2^128 (the tie rounds to even, which is infinity)
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def _layer(dtype=torch.float32, adapter_dtype=None, zero_b=True):
    adapter_dtype = adapter_dtype or dtype
    torch.manual_seed(0)
    lora_B = torch.zeros(6, 2) if zero_b else torch.randn(6, 2)
    return dict(x=torch.randn(5, 8).to(dtype), weight=torch.randn(6, 8).to(dtype),
                lora_A=torch.randn(2, 8).to(adapter_dtype), lora_B=lora_B.to(adapter_dtype),
                bias=torch.randn(6).to(dtype))


LINEAR_ENTRIES = {"lora_linear": lorakern.lora_linear, "reference": reference.lora_linear}


# ------------------------------------------------------------ a scale the dtype cannot hold
def test_the_overflow_threshold_of_these_tests_is_float32s():
    assert torch.tensor(FLOAT32_OVERFLOW, dtype=torch.float64).float().isinf()
    below = torch.nextafter(torch.tensor(FLOAT32_OVERFLOW, dtype=torch.float64),
                            torch.tensor(0.0, dtype=torch.float64))
    assert below.float().item() == FLOAT32_MAX


@pytest.mark.parametrize("entry", LINEAR_ENTRIES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None),
                                                 (torch.bfloat16, None),
                                                 (torch.float16, None),
                                                 (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("scale", [1e39, -1e39, FLOAT32_OVERFLOW])
def test_a_scale_that_overflows_float32_is_refused_naming_scale_and_dtype(entry, dtype,
                                                                           adapter_dtype, scale):
    layer = _layer(dtype, adapter_dtype)
    before = sum(kernels.launch_counts.values())
    with pytest.raises(ValueError, match=r"scale=.*e\+38|scale=.*e\+39") as raised:
        LINEAR_ENTRIES[entry](**layer, scale=scale)
    assert "torch.float32" in str(raised.value)
    assert sum(kernels.launch_counts.values()) == before


@pytest.mark.parametrize("entry", LINEAR_ENTRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [FLOAT32_MAX, -FLOAT32_MAX])
def test_the_largest_float32_scale_with_zero_lora_B_gives_the_base_layer(entry, dtype, scale):
    """The largest scale float32 holds is taken: with B = 0 the LoRA term is exactly
    zero and the output is x W^T + b (nothing overflows, nothing turns NaN)."""
    layer = _layer(dtype)
    y = LINEAR_ENTRIES[entry](**layer, scale=scale)
    expected = F.linear(*(layer[k].double() for k in ("x", "weight", "bias")))
    assert y.dtype == dtype
    assert_matches_oracle(y, expected, dtype, "y")


@pytest.mark.parametrize("entry", LINEAR_ENTRIES)
@pytest.mark.parametrize("base_dtype", [torch.float64, torch.float32], ids=str)
def test_a_float64_computation_takes_a_scale_beyond_float32(entry, base_dtype):
    """float64 adapters (or a float64 layer) compute the LoRA term in float64, which
    holds 1e39: accepted, and with B = 0 the output is the base layer's."""
    layer = _layer(base_dtype, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float64 takes the reference
        y = LINEAR_ENTRIES[entry](**layer, scale=1e39)
    expected = F.linear(layer["x"], layer["weight"], layer["bias"])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def _embedding(adapter_dtype, zero_b=True):
    torch.manual_seed(0)
    lora_B = torch.zeros(6, 2) if zero_b else torch.randn(6, 2)
    return dict(ids=torch.tensor([0, 3, 3, 1]), weight=torch.randn(5, 6),
                lora_A=torch.randn(2, 5).to(adapter_dtype), lora_B=lora_B.to(adapter_dtype))


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_embedding_scale_that_overflows_float32_is_refused(adapter_dtype):
    layer = _embedding(adapter_dtype)
    before = sum(kernels.launch_counts.values())
    with pytest.raises(ValueError, match=r"scale=1e\+39.*torch.float32"):
        lorakern.lora_embedding(**layer, scale=1e39)
    assert sum(kernels.launch_counts.values()) == before


def test_the_largest_float32_scale_on_an_embedding_with_zero_lora_B_gives_the_table():
    layer = _embedding(torch.float32)
    y = lorakern.lora_embedding(**layer, scale=FLOAT32_MAX)
    torch.testing.assert_close(y, layer["weight"][layer["ids"]], rtol=0, atol=0)


def test_float64_embedding_adapters_take_a_scale_beyond_float32():
    layer = _embedding(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float64 takes the reference
        y = lorakern.lora_embedding(**layer, scale=1e39)
    torch.testing.assert_close(y, layer["weight"][layer["ids"]], rtol=0, atol=0)


# ---------------------------------------- one rounding rule in fp16, whatever the batch size
def _rounding_layer(rows, adapter_dtype):
    """fp16 rows whose exact sums show where each part is rounded (every value exact):
    row 0: x W^T = 65536 (overflows fp16 alone), LoRA term -64: y = 65472;
    row 1: x W^T = -256, LoRA term 2 * 32768 = 65536 (overflows fp16 alone): y = inf;
    row 2: x W^T = 256, LoRA term 1, bias 0.5: y = 257.5."""
    x = torch.tensor([[256.0, 1.0]]).repeat(rows, 1).half()
    weight = torch.tensor([[256.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]).half()
    lora_A = torch.tensor([[0.0, 1.0]]).to(adapter_dtype)
    lora_B = torch.tensor([[-32.0], [32768.0], [0.5]]).to(adapter_dtype)
    bias = torch.tensor([0.0, 0.0, 0.5]).half()
    return dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias, scale=2.0)


ROUNDED_ROWS = torch.tensor([65472.0, float("inf"), 257.5])


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("path", ["fused", "cublas", "reference"])
def test_fp16_rounds_the_lora_term_and_bias_once_then_the_sum_once_in_every_path(
        path, rows, adapter_dtype, device, monkeypatch):
    """y = round(x W^T + round(s * LoRA + b)): x W^T stays in fp32 until the one
    rounding of y, the LoRA term with the bias is rounded to fp16 first (it is
    cuBLAS's C operand). Every strategy and the reference give the same bits at
    1 row and at 300 (where the table would switch strategy)."""
    layer = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in _rounding_layer(rows, adapter_dtype).items()}
    if path == "reference":
        y = reference.lora_linear(**layer)
    else:
        monkeypatch.setenv("LORAKERN_STRATEGY", path)
        y = lorakern.lora_linear(**layer)
    assert y.dtype == torch.float16
    expected = ROUNDED_ROWS.half().to(device).expand(rows, 3)
    assert torch.equal(y, expected), f"{path}: {y[0].tolist()}, expected {expected[0].tolist()}"


# ------------------------------------------------- mixed adapter dtypes in the embedding
@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.bfloat16)], ids=str)
def test_embedding_kernels_compute_mixed_adapters_in_their_promoted_dtype(a_dtype, b_dtype,
                                                                          device):
    """As the reference (and the linear layer): the rank product in the promoted dtype
    of A and B, so fp32 B is not rounded to A's 16 bits; each gradient comes back in
    its parameter's dtype, rounded once from fp32."""
    torch.manual_seed(3)
    ids = torch.randint(0, 13, (4, 5), device=device)
    weight = torch.randn(13, 20, device=device)
    lora_A = torch.randn(4, 13, device=device).to(a_dtype).requires_grad_()
    lora_B = torch.randn(20, 4, device=device).to(b_dtype).requires_grad_()
    launches = kernels.launch_counts["lora_embedding_forward"]
    y = lorakern.lora_embedding(ids, weight, lora_A, lora_B, 0.75)
    assert kernels.launch_counts["lora_embedding_forward"] == launches + 1
    grad_y = torch.randn(y.shape, device=device)
    y.backward(grad_y)

    leaves = {name: t.detach().cpu().double().requires_grad_()
              for name, t in (("lora_A", lora_A), ("lora_B", lora_B))}
    expected = reference.lora_embedding(ids.cpu(), weight.cpu().double(), leaves["lora_A"],
                                        leaves["lora_B"], 0.75)
    expected.backward(grad_y.cpu().double())
    # A, B and dY hold exact values of their dtypes: everything is exact in fp32 but
    # the rounding of each gradient to its parameter's dtype
    assert y.dtype == torch.float32
    assert_matches_oracle(y.detach().cpu(), expected.detach(), torch.float32, "y")
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        assert tensor.grad.dtype == tensor.dtype, name
        assert_matches_oracle(tensor.grad.cpu(), leaves[name].grad, tensor.dtype, f"d{name}")


# ------------------------------------------------ tensor scalars under torch.compile
def _compile_error(function, *args):
    torch._dynamo.reset()
    with pytest.raises(Exception) as raised:
        torch.compile(function, fullgraph=True, backend="aot_eager")(*args)
    return raised.value


@pytest.mark.parametrize("name", ["scale", "dropout_p"])
def test_a_tensor_scale_or_dropout_under_fullgraph_compile_is_refused_saying_what_to_pass(
        name, device):
    layer = {k: v.to(device) for k, v in _layer(zero_b=False).items()}
    scalars = {"scale": 2.0, "dropout_p": 0.0}
    scalars[name] = torch.tensor(0.5 if name == "scale" else 0.1, device=device)

    def call(x, value):
        return lorakern.lora_linear(x, layer["weight"], layer["lora_A"], layer["lora_B"],
                                    bias=layer["bias"], **{**scalars, name: value})

    message = str(_compile_error(call, layer["x"], scalars[name]))
    # torch.compile reports the refusal as its own error, with lorakern's reason
    assert f"{name} is a tensor inside torch.compile" in message, message
    assert f"Pass {name} as a Python float" in message, message
    assert "sympy" not in message and "data-dependent" not in message, message


def test_a_tensor_scale_of_an_embedding_under_fullgraph_compile_is_refused(device):
    layer = {k: v.to(device) for k, v in _embedding(torch.float32, zero_b=False).items()}

    def call(ids, scale):
        return lorakern.lora_embedding(ids, layer["weight"], layer["lora_A"], layer["lora_B"],
                                       scale)

    message = str(_compile_error(call, layer["ids"], torch.tensor(0.5, device=device)))
    assert "scale is a tensor inside torch.compile" in message, message
    assert "Pass scale as a Python float" in message, message


def test_a_tensor_scale_without_fullgraph_runs_eagerly_and_gives_the_eager_result(device):
    layer = {k: v.to(device) for k, v in _layer(zero_b=False).items()}
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s: lorakern.lora_linear(
        x, layer["weight"], layer["lora_A"], layer["lora_B"], s, layer["bias"]),
        backend="aot_eager")
    y = compiled(layer["x"], torch.tensor(0.5, device=device))
    expected = lorakern.lora_linear(**layer, scale=0.5)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_a_tensor_scale_is_still_read_out_in_eager(device):
    layer = {k: v.to(device) for k, v in _layer(zero_b=False).items()}
    torch.testing.assert_close(lorakern.lora_linear(**layer, scale=torch.tensor(0.5)),
                               lorakern.lora_linear(**layer, scale=0.5), rtol=0, atol=0)


# ------------------------------------------------------------- autocast and float64
AUTOCAST_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def test_a_float64_layer_under_cpu_autocast_stays_float64_as_nn_linear_does():
    layer = _layer(torch.float64, zero_b=False)
    with torch.autocast("cpu", torch.bfloat16):
        y = lorakern.lora_linear(**layer, scale=0.5)
        base = torch.nn.functional.linear(layer["x"], layer["weight"], layer["bias"])
    assert base.dtype == torch.float64
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference.lora_linear(**layer, scale=0.5), rtol=0, atol=0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("x_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", AUTOCAST_DTYPES, ids=str)
def test_under_cpu_autocast_lora_linear_takes_the_dtypes_f_linear_takes(autocast_dtype,
                                                                         x_dtype, weight_dtype):
    """Autocast casts every floating operand of F.linear but float64 to its dtype: the
    output dtype is F.linear's, and where F.linear refuses the mix, lorakern does too,
    before running anything."""
    layer = _layer(zero_b=False)
    layer["x"] = layer["x"].to(x_dtype)
    layer["weight"], layer["bias"] = layer["weight"].to(weight_dtype), None
    with torch.autocast("cpu", autocast_dtype):
        try:
            expected_dtype = F.linear(layer["x"], layer["weight"]).dtype
        except RuntimeError:
            expected_dtype = None
        if expected_dtype is None:
            with pytest.raises(TypeError, match="x, weight and bias must share one dtype"):
                lorakern.lora_linear(**layer, scale=0.5)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float64 takes the reference
            y = lorakern.lora_linear(**layer, scale=0.5)
    assert y.dtype == expected_dtype


def test_float64_adapters_under_autocast_are_left_in_float64():
    """Autocast leaves float64 alone, adapters too: the LoRA term is computed in
    float64 (the promoted dtype) and the output has the autocast dtype of x."""
    layer = _layer(torch.float32, torch.float64, zero_b=False)
    with torch.autocast("cpu", torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float64 takes the reference
            y = lorakern.lora_linear(**layer, scale=0.5)
    cast = {k: (v.to(torch.bfloat16) if k in ("x", "weight", "bias") else v)
            for k, v in layer.items()}
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference.lora_linear(**cast, scale=0.5), rtol=0, atol=0)


# ------------------------------------------------------ the interpreter's environment
CHILD_SEES = ("import os, subprocess, sys\n"
              "def child_sees():\n"
              "    return subprocess.run([sys.executable, '-c', 'import os; "
              "print(os.environ.get(\"TRITON_INTERPRET\"))'], capture_output=True, text=True,"
              " env=os.environ.copy()).stdout.strip()\n")

KERNELS_THEN_CHILD = CHILD_SEES + (
    "import torch, lorakern\n"
    "def run_layers():\n"
    "    x, w = torch.randn(5, 8), torch.randn(6, 8)\n"
    "    a, b = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)\n"
    "    y = lorakern.lora_linear(x, w, a, b, 0.5, None, 0.25)\n"
    "    y.sum().backward()\n"
    "    y = lorakern.lora_linear(x, w, a, b, 0.5)\n"
    "    assert torch.allclose(y, lorakern.reference.lora_linear(x, w, a, b, 0.5), rtol=1e-5,"
    " atol=1e-5)\n"
    "    ids = torch.tensor([0, 4, 4, 2])\n"
    "    e, ea, eb = torch.randn(5, 6), torch.randn(2, 5), torch.randn(6, 2)\n"
    "    assert torch.allclose(lorakern.lora_embedding(ids, e, ea, eb, 0.5),\n"
    "                          lorakern.reference.lora_embedding(ids, e, ea, eb, 0.5),"
    " rtol=1e-5, atol=1e-5)\n"
    "run_layers()\n"
    "from lorakern import kernels  # imported by the first call, in the interpreter\n"
    "first = sum(kernels.launch_counts.values())\n"
    "assert first > 0 and kernels._common.INTERPRET, kernels.launch_counts\n"
    "print('parent', os.environ.get('TRITON_INTERPRET'))\n"
    "print('child', child_sees())\n"
    "for strategy in ('fused', 'cublas'):\n"
    "    os.environ['LORAKERN_STRATEGY'] = strategy\n"
    "    run_layers()\n"
    "assert kernels.launch_counts['lora_term'] > 0, kernels.launch_counts\n"
    "assert sum(kernels.launch_counts.values()) > first, kernels.launch_counts\n"
    "print('ok')\n")


def _run_fresh_process(script, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", **env_changes)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout.strip().splitlines(), done.stderr[-3000:]


@pytest.mark.parametrize("imported_first", ["", "triton", "peft"])
def test_backend_triton_leaves_the_environment_of_child_processes_alone(imported_first):
    """LORAKERN_BACKEND=triton switches the interpreter on for the import of the kernels
    only: the process's environment, and so a child's, has no TRITON_INTERPRET after
    it, and the kernels keep running in the interpreter."""
    script = (f"import {imported_first}\n" if imported_first else "") + KERNELS_THEN_CHILD
    returncode, lines, stderr = _run_fresh_process(script, LORAKERN_BACKEND="triton")
    assert returncode == 0, stderr
    assert lines == ["parent None", "child None", "ok"], (lines, stderr)


def test_a_triton_interpret_set_by_the_user_is_kept():
    returncode, lines, stderr = _run_fresh_process(KERNELS_THEN_CHILD, TRITON_INTERPRET="1")
    assert returncode == 0, stderr
    assert lines == ["parent 1", "child 1", "ok"], (lines, stderr)


# ------------------------------------------------------------ declared dependencies
def test_install_requires_names_numpy_which_triton_interpreter_and_torch_import():
    """`pip install .` must bring numpy: Triton's interpreter (the kernels on CPU
    tensors) imports it, and torch warns at import without it. requirements.txt's
    numpy>=2 lies inside setup.py's range (tests/test_packaging.py checks that)."""
    import numpy
    import triton.runtime.interpreter as interpreter

    with open(interpreter.__file__, encoding="utf-8") as source:
        assert "import numpy" in source.read()
    requires = setup_install_requires()
    assert "numpy" in requires, f"setup.py install_requires {sorted(requires)} has no numpy"
    bound = requires["numpy"]
    assert bound.marker is None, f"numpy is needed on every platform, got `{bound}`"
    assert [spec.operator for spec in bound.specifier] == [">="], bound
    assert bound.specifier.contains(numpy.__version__.split("+")[0], prereleases=True)
