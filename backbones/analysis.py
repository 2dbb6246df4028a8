"""Parameter and FLOP counts (fvcore) of a model, in total and per top-level part.

fvcore counts one multiply-add as one FLOP, as Table 1 of the ResNet paper does.
"""

import logging
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

# Ops besides conv / linear / matmul that fvcore counts by default. The paper counts only
# the multiply-adds of convolutions and fully connected layers.
_NON_MAC_OPS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def _zero_flops(inputs, outputs) -> int:
    return 0


def flop_count(
    model: nn.Module, inputs: Tuple, *, macs_only: bool = True
) -> FlopCountAnalysis:
    """An fvcore ``FlopCountAnalysis`` of ``model(*inputs)`` in eval mode, without warnings.
    With ``macs_only`` only convolutions, linear layers and matrix products are counted."""
    was_training = model.training
    model.eval()
    analysis = FlopCountAnalysis(model, inputs)
    if macs_only:
        # fvcore ignores a None handle only for ops it has no handle of its own for, so
        # count these as zero instead.
        analysis.set_op_handle(**{op: _zero_flops for op in _NON_MAC_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch.jit's deprecation notice, once per trace
        warnings.simplefilter("ignore")
        analysis.total()  # run the trace now, in eval mode
    model.train(was_training)
    return analysis


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def part_table(
    model: nn.Module, input_size: Tuple[int, int] = (224, 224), *,
    parts: Optional[Iterable[str]] = None, depth: int = 1, macs_only: bool = True,
    inputs: Optional[Tuple] = None,
) -> List[Tuple[str, int, int]]:
    """Rows (name, parameters, FLOPs) for each module ``depth`` levels down (or the named
    ``parts``), then a "total" row, for one ``(1, 3, H, W)`` input (or ``inputs``)."""
    if inputs is None:
        inputs = (torch.zeros(1, 3, *input_size),)
    with torch.no_grad():
        analysis = flop_count(model, inputs, macs_only=macs_only)
    by_module = analysis.by_module()
    if parts is None:
        parts = [n for n, _ in model.named_modules() if n and n.count(".") == depth - 1]
    modules = dict(model.named_modules())
    rows = []
    for name in parts:
        if name not in modules:
            raise KeyError(f"{name!r} is not a submodule; valid: {sorted(modules)[:20]} ...")
        rows.append((name, count_parameters(modules[name]), int(by_module.get(name, 0))))
    rows.append(("total", count_parameters(model), int(analysis.total())))
    return rows


def format_table(rows: List[Tuple[str, int, int]], title: str = "") -> str:
    width = max(len(r[0]) for r in rows + [("part", 0, 0)])
    lines = [title] if title else []
    lines.append(f"{'part':<{width}}  {'params':>14}  {'GFLOPs':>9}")
    for name, params, flops in rows:
        lines.append(f"{name:<{width}}  {params:>14,}  {flops / 1e9:>9.3f}")
    return "\n".join(lines)


def flops_by_part(model: nn.Module, inputs: Tuple, parts: Iterable[str]) -> Dict[str, float]:
    """GFLOPs of the named submodules of ``model(*inputs)``, plus "total"."""
    analysis = flop_count(model, inputs)
    by_module = analysis.by_module()
    out = {p: by_module.get(p, 0) / 1e9 for p in parts}
    out["total"] = analysis.total() / 1e9
    return out
