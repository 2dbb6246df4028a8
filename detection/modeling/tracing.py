"""Image-size arithmetic that stays symbolic when a model is traced for export.

In eager mode an image's height and width are Python ints. Under ``torch.jit.trace`` (which
``torch.onnx.export`` uses) ``tensor.shape[i]`` is a 0-dim int64 tensor that the tracer
follows, so a graph traced on one image size runs on every other: as long as the code never
turns it into a Python number (``int()``, ``math.ceil``, ``min()`` of sizes, a Python ``if``
on it). The model's code computes sizes with the functions below, which take either form and
return the same form, so one code path serves both eager inference and export.
"""

from typing import Sequence, Union

import torch
from torch import Tensor

Size = Union[int, Tensor]  # a Python int in eager mode, a 0-dim int64 tensor when traced


def is_tracing() -> bool:
    """True while ``torch.jit.trace`` (or the ONNX exporter) records the model."""
    return torch.jit.is_tracing()


def as_size(value: Size) -> Size:
    """``int(value)`` in eager mode; the traced tensor itself under tracing."""
    if isinstance(value, Tensor) and is_tracing():
        return value
    return int(value)


def size_tensor(values: Sequence[Union[int, float, Tensor]], *, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """A 1-D tensor of ``values`` (ints, floats or traced 0-dim tensors) that keeps the traced
    ones symbolic, where ``torch.tensor`` would record them as constants."""
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([(v if isinstance(v, Tensor) else torch.tensor(v)).to(device, dtype)
                            for v in values])
    return torch.tensor(values, dtype=dtype, device=device)


def min_size(k: int, length: Size) -> Size:
    """``min(k, length)`` for a top-k over a dimension of ``length`` elements (traced: a
    tensor, as ``topk`` accepts)."""
    if isinstance(length, Tensor) and is_tracing():
        return torch.clamp(length, max=k)
    return min(k, int(length))
