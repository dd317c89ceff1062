"""The base weight W of a LoRA linear layer, and the interface the launch sequence
reads it through.

    y = x W^T + b + s * (drop(x) A^T) B^T,    W (out_features, in_features)

What the launch sequence (``fused_linear.py``) needs from W, whatever its storage:

- ``shape``: (out_features, in_features); ``dtype``: the dtype the layer computes
  in (x's, and the GEMMs' operand dtype); ``device``;
- ``kernel_operand()``: what the kernels' GEMMs (and, in the ``cublas``
  strategy, torch's matmul) read as W;
- ``grad_buffer()``: where dW is written when autograd asks for it (a base that
  cannot train refuses);
- ``strategy``: the one strategy the base can be served by, or None (any).

``DenseWeight`` is the one kind the kernels serve today: W held as a
floating-point tensor of x's dtype (an nn.Linear's weight, or the transposed
view of a transformers Conv1D's), read as rows of unit stride. A base of
another storage (a quantised weight and its scales) is a second
implementation of the same members, its ``kernel_operand`` what the GEMM
dequantises tile by tile; nothing else in the launch sequence changes.
"""
import abc

from .layouts import unit_rows


class BaseWeight(abc.ABC):
    """The interface; see the module docstring."""

    strategy = None

    @property
    @abc.abstractmethod
    def shape(self):
        """(out_features, in_features)."""

    @property
    @abc.abstractmethod
    def dtype(self):
        """The dtype the layer computes in."""

    @property
    @abc.abstractmethod
    def device(self):
        """Where W lives."""

    @abc.abstractmethod
    def kernel_operand(self):
        """What the GEMMs read as W."""

    @abc.abstractmethod
    def grad_buffer(self, empty):
        """dW's storage, from ``empty(shape, dtype, device)`` (the kernels' allocator)."""


class DenseWeight(BaseWeight):
    """W as a floating-point (out, in) tensor, or a view of one."""

    def __init__(self, weight):
        self.weight = weight

    @property
    def shape(self):
        return self.weight.shape

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def device(self):
        return self.weight.device

    def kernel_operand(self):
        return unit_rows(self.weight, "W")

    def grad_buffer(self, empty):
        return empty(self.weight.shape, self.weight.dtype, self.weight.device)
