from pathlib import Path

from setuptools import setup

setup(
    name="lorakern",
    version="0.1.0",
    description="Fused Triton kernels for LoRA linear layers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # every package under lorakern/ (tests/test_layout.py checks the list against the tree)
    packages=["lorakern", "lorakern.functional", "lorakern.layers", "lorakern.models",
              "lorakern.peft", "lorakern.kernels"],
    package_dir={"lorakern": "lorakern", "lorakern.kernels": "kernels"},
    python_requires=">=3.10",
    # torch 2.4 is the first with torch.library.custom_op and its register_fake /
    # register_autograd (lorakern/functional/ops.py); on Linux it requires triton 3.0, whose
    # tl.dot takes input_precision, the newest language feature the kernels use.
    # triton has no macOS or Windows wheels: there lorakern runs its PyTorch
    # reference, as it does on any machine without triton.
    # numpy on every platform: Triton's interpreter (the kernels on CPU tensors) imports
    # it, and torch warns at import without it. torch's C extension takes NumPy's C API
    # 1.20 and newer; 1.23, the oldest numpy with Python 3.11 wheels, is the oldest the
    # kernels were run with (the pinned torch 2.13 and triton 3.7.1, in the interpreter).
    install_requires=["torch>=2.4", 'triton>=3.0; platform_system == "Linux"', "numpy>=1.23"],
    extras_require={
        "test": ["pytest>=7", "numpy", "peft>=0.13", "transformers>=4.45", "safetensors"],
        "peft": ["peft>=0.13", "safetensors"],
        # bitsandbytes 4-bit and 8-bit bases (QLoRA); 0.46 is the first with a CPU backend
        "bnb": ["bitsandbytes>=0.46"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "transformers>=4.45", "matplotlib"],
    },
)
