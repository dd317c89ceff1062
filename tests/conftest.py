"""Test setup: where the kernels run.

With CUDA available the whole suite runs on the GPU with compiled kernels.
Without it (or with LORAKERN_TEST_DEVICE=cpu) the kernels run on CPU tensors
in Triton's interpreter, which must be switched on before triton is imported.
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("LORAKERN_TEST_DEVICE") != "cpu"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an unwritten element fails a test."""
    from lorakern.kernels import _common
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The tuner's file in a fresh directory, the tuner's memory cleared before and
    after (on CUDA the layers tune by default)."""
    from lorakern.functional import autotune
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORAKERN_AUTOTUNE", raising=False)
    autotune.reset()
    yield tmp_path
    autotune.reset()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A one-layer bf16 Llama checkpoint (tests/tiny_llama.py) for the QLoRA tests."""
    from tiny_llama import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
