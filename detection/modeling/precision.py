"""The pieces of bf16 inference that keep the detections: ``Cast`` (a part run on inputs cast
to one dtype, its outputs cast to another), ``run_in`` and ``RefinedRPNHead`` (an RPN head
ranked in bf16 and recomputed in float32 at the top anchors), and ``check_precision``.

Which parts of a model run in bf16 is declared by each model class (``bf16_split``) and
applied by ``detection.optimize``. The detectors' split: the backbone (ResNet and FPN: 120 of
the R50-FPN detector's 178 G multiply-adds) and the mask head's convs in bf16; the RPN head
refined; anchors, box decoding, top-k and NMS, RoIAlign, the box head and predictor, the
softmax, the rescaling to the input image and the mask pasting in float32. How much each
choice keeps of the float32 detections is in docs/benchmarks.md.
"""

import copy
from typing import Any, List, Sequence, Tuple, Union

import torch
from torch import nn

from backbones.machine import require_precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class Cast(nn.Module):
    """``module`` run on inputs cast to ``input_dtype``, its outputs (tensors, or lists,
    tuples and dicts of them) cast to ``output_dtype``."""

    def __init__(self, module: nn.Module, *, input_dtype: torch.dtype,
                 output_dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.input_dtype, self.output_dtype = module, input_dtype, output_dtype

    def forward(self, *args: Any) -> Any:
        return _cast(self.module(*_cast(args, self.input_dtype)), self.output_dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. box_head.out_dim, rpn head attributes
            return getattr(self._modules["module"], name)


def run_in(module: nn.Module, dtype: torch.dtype, *, output_dtype: torch.dtype) -> Cast:
    """``module`` with its parameters and buffers in ``dtype``, wrapped to take any float
    input and return ``output_dtype``."""
    return Cast(module.to(dtype), input_dtype=dtype, output_dtype=output_dtype)


def check_precision(precision: str, device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """The dtype a model's backbone runs in at ``precision`` ("fp32", "bf16" or "auto": bf16
    where ``device`` has it natively) on ``device``. bf16 where it is not native raises
    ``backbones.machine.PrecisionUnavailable``, naming the missing CPU flags."""
    return DTYPES[require_precision(precision, str(device))]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def low_precision_parts(model: nn.Module) -> Sequence[str]:
    """Names of the submodules that ``detection.optimize`` wrapped to run in bf16 (for
    reports)."""
    return [name for name, m in model.named_modules() if isinstance(m, Cast)
            and m.input_dtype == torch.bfloat16]


class RefinedRPNHead(nn.Module):
    """An RPN head (one 3x3 conv with ReLU, then the 1x1 objectness and delta convs) that runs
    in bf16 at every location and again in float32 where it matters.

    The bf16 pass only ranks the anchors. At the locations of each level's top
    ``refine_topk`` anchors (the RPN keeps its ``pre_nms_topk`` of them; the rest is a margin)
    the head is computed again in float32 from the same features: the 3x3 window of each
    location as one matrix product with the conv's weights, then the 1x1 predictors. Those
    locations' logits and deltas, every anchor of them, are the float32 head's up to the
    order of sums; the proposals come from them. Inference only; a float32 head's weights.
    (On the R50-FPN detector at 800x1067 the refinement covers about 5,000 locations.)"""

    def __init__(self, head: nn.Module, refine_topk: int, dtype: torch.dtype) -> None:
        super().__init__()
        if len(head.convs) != 1:
            raise ValueError("RefinedRPNHead needs an RPN head of one 3x3 conv")
        conv = head.convs[0]
        weight, bias = conv.weight.detach().float(), conv.bias.detach().float()
        if tuple(weight.shape[2:]) != (3, 3) or list(conv.padding) != [1, 1] \
                or list(conv.stride) != [1, 1]:
            raise ValueError("RefinedRPNHead needs a 3x3 conv of stride 1 and padding 1")
        channels = weight.shape[1]
        self.refine_topk = int(refine_topk)
        self.low = copy.deepcopy(head).to(dtype)
        # float32 copies: the window (ky, kx, channel) -> conv output, and the 1x1 predictors
        self.register_buffer("window_weight", weight.permute(2, 3, 1, 0)
                             .reshape(9 * channels, -1).contiguous(), persistent=False)
        self.register_buffer("conv_bias", bias, persistent=False)
        self.register_buffer("predictor_weight", torch.cat(
            [head.objectness.weight.detach(), head.deltas.weight.detach()]).float()
            .flatten(1).t().contiguous(), persistent=False)
        self.register_buffer("predictor_bias", torch.cat(
            [head.objectness.bias.detach(), head.deltas.bias.detach()]).float(),
            persistent=False)

    def forward(self, features: Sequence[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            lg, dl = self.low([x])
            lg, dl = lg[0].float().contiguous(), dl[0].float().contiguous()
            for i in range(x.shape[0]):
                self._refine(x[i], lg[i], dl[i])
            logits.append(lg)
            deltas.append(dl)
        return logits, deltas

    def _refine(self, x: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor) -> None:
        """In place: ``logits`` ``(A, H, W)`` and ``deltas`` ``(4A, H, W)`` of one image
        recomputed in float32 at the locations of its top anchors; ``x`` ``(C, H, W)``."""
        a, h, w = logits.shape
        k = min(self.refine_topk, logits.numel())
        top = logits.reshape(-1).topk(k).indices % (h * w)  # anchor index = a * HW + loc
        loc = torch.unique(top)
        ys, xs = loc // w, loc % w
        offsets = torch.arange(-1, 2, device=x.device)
        rows = ys[:, None, None] + offsets[None, :, None]  # [L, 3, 1]
        cols = xs[:, None, None] + offsets[None, None, :]  # [L, 1, 3]
        inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w))[..., None]
        nhwc = x.permute(1, 2, 0)  # a view of a channels-last map
        window = nhwc[rows.clamp(0, h - 1), cols.clamp(0, w - 1)].float() * inside
        hidden = torch.relu(torch.addmm(self.conv_bias, window.reshape(loc.numel(), -1),
                                        self.window_weight))
        out = torch.addmm(self.predictor_bias, hidden, self.predictor_weight)  # [L, 5A]
        logits.view(a, -1)[:, loc] = out[:, :a].t()
        deltas.view(4 * a, -1)[:, loc] = out[:, a:].t()
