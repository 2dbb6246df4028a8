"""bf16 inference that keeps the detections: the backbone's convolutions in bf16, everything
that makes the final numbers in float32.

In bf16: the backbone (ResNet and FPN: 120 of the R50-FPN detector's 178 G multiply-adds) and
the mask head's convs. The RPN head (one 3x3 conv, 43 G multiply-adds) runs in bf16 to rank
the anchors and again in float32 at the locations of the top ones (``RefinedRPNHead``): the
proposals come from float32 logits and deltas. In float32: that refinement, anchors, the
decoding of every box delta, the RPN's top-k and NMS, RoIAlign (bilinear samples of the bf16
features, computed in float32), the box head and predictor (class scores and the final box
regression), the score softmax, the final NMS, the rescaling of boxes to the input image,
and the mask predictor and pasting.

Measured on the trained shapes default (250 val images, detections scoring >= 0.07, kept when
the same label, IoU > 0.95 and score within 0.02 come back): this split keeps 99.03%; with the
box head in bf16 too, 98.96%; with the RPN head in bf16 too, 97.7% (20 images); with the
anchors computed in the features' bf16 (a bug, fixed), 89%. On a later training run of the
same config (3,023 detections): 98.94%; with the FPN's convs in float32 too, 98.91%; with
the ResNet stem in float32 too, 98.94%: what is lost comes from the ResNet's stages.

On a third run (2,845 detections): 98.84% with the RPN head in float32; with any one ResNet
stage in float32 too, 98.66-98.88% (res2 98.70, res3 98.66, res4 98.80, res5 98.88): no
stage holds the loss. The RPN head in plain bf16, 97.82%; refined (``RefinedRPNHead``),
98.88%, and 0.19 s faster on the R50-FPN detector at 800x1067 (1.37 s against 1.55 s).
The box head's two fcs in bf16 too: 98.84% and 0.075 s faster (1.18 s against 1.26 s); not
taken, as the share kept is already at the bar.
About half the detections lost have the same score (within 0.005) and a box of IoU 0.7-0.95:
a near-tie between two overlapping proposals in the RPN's NMS that bf16's rounding of the
features decides the other way, which the briefly trained box head does not regress back to
one box; the others are low-scoring (mostly < 0.3) small shapes whose score moves by more
than 0.02.

The default's later recipe (500 iterations in bf16 autocast, 2026-12-03): 99.28% of 2,089
detections (seed 0, AP 79.9), 98.80% of 2,828 (seed 1, AP 73.1); with the box head's fcs in
bf16 too, 99.04% and 98.51%. Of seed 0's 15 losses, 9 come back with the same score (often
to 1e-3) and a box of IoU 0.68-0.95 with float32's: two detections of one object from two
overlapping proposals (the RPN's proposals themselves match, 199-200 of 200 at IoU > 0.99),
whose scores tie within bf16's error, so the final NMS keeps the other one. The share kept
moves with the model by more than the bar's margin.
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
    """Names of the submodules that ``GeneralizedRCNN.optimize_for_inference(precision=
    "bf16")`` runs in bf16 (for reports)."""
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

    Measured on the R50-FPN detector at 800x1067: the head's conv 0.21-0.27 s in bf16
    against 0.43-0.47 s in float32; the refinement, about 5,000 locations, some 0.03 s."""

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
