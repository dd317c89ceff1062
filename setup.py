from pathlib import Path

from setuptools import setup

setup(
    name="lorakern",
    version="0.1.0",
    description="Fused Triton kernels for LoRA linear layers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=["lorakern", "lorakern.kernels"],
    package_dir={"lorakern": "lorakern", "lorakern.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "triton>=3.0"],
    extras_require={
        "test": ["pytest>=7", "numpy", "peft>=0.13", "transformers>=4.45", "safetensors"],
        "peft": ["peft>=0.13", "safetensors"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "transformers>=4.45", "matplotlib"],
    },
)
