"""One inference optimizer for every family: ``optimize_for_inference(model, precision=...)``.

It reads what the modules declare, never a family's attribute names:

- ``conv_norm_pairs`` (and conv/norm pairs inside ``nn.Sequential``): norms folded into the
  convs (``backbones.inference.fold_frozen_batchnorm``);
- ``residual_convs``, ``relu_after_pairs``, ``addend_after_pairs``: ResNet blocks, stems and
  FPN convs fused with their ReLU and residual add (``backbones.fused``);
- ``relu_layers``: attribute names of layers (a conv, linear, ``ConvNorm`` or a ModuleList of
  them) whose ReLU the module applies with ``apply_relu``; each gets the ReLU inside;
- ``plain_layers``: convs without a ReLU made ``FusedConv2d`` so that Winograd can take them;
- ``use_channels_last()``: a module's own layout change for channels-last inputs;
- ``bf16_split`` on the model class: which parts run in bf16 under ``precision="bf16"``, by
  dotted path (see ``SPLIT_MODES``); everything else stays float32.

Winograd (``backbones.winograd``) takes the fused 3x3 convs that run in float32. The model
records ``precision``, ``input_dtype`` and ``input_channels_last``, which
``detection.modeling.preprocess.as_model_input`` applies to its batch. Inference only: the
folded model cannot train its norms any more.
"""

from typing import Dict, Mapping

import torch
from torch import nn

from backbones.fused import FusedConv2d, FusedLinear, fuse_conv_relu, use_winograd
from backbones.inference import fold_frozen_batchnorm

from .modeling.precision import Cast, RefinedRPNHead, check_precision, model_device, run_in

__all__ = ["SPLIT_MODES", "optimize_for_inference", "supports_bf16"]

#: How a part named in a model's ``bf16_split`` runs under ``precision="bf16"``.
SPLIT_MODES: Mapping[str, str] = {
    "input": "bf16 weights on the model's input, which is cast to bf16 (the backbone)",
    "bf16": "bf16 weights, inputs cast to bf16, outputs left in bf16",
    "bf16->fp32": "bf16 weights, inputs cast to bf16, outputs cast to float32",
    "fp32": "float32 weights, inputs cast to float32 (a head after a bf16 backbone)",
    "refined": "an RPN head ranked in bf16 and recomputed in float32 at the top anchors "
               "(RefinedRPNHead; its parent gives refine_topk); float32 for other heads",
}


def supports_bf16(model: nn.Module) -> bool:
    """Whether ``model``'s class declares a bf16 split."""
    return bool(getattr(model, "bf16_split", None))


def _fused_relu_layer(layer: nn.Module) -> nn.Module:
    """``layer`` with its following ReLU inside, where it can take it; else ``layer``."""
    if type(layer) is nn.Conv2d:
        return FusedConv2d(layer, relu=True)
    if type(layer) is nn.Linear:
        return FusedLinear(layer, relu=True)
    if isinstance(layer, FusedConv2d):
        layer.relu = layer.fused_relu = True
        return layer
    pairs = getattr(layer, "conv_norm_pairs", ())
    if len(pairs) == 1 and isinstance(getattr(layer, pairs[0][1]), nn.Identity):
        conv_name = pairs[0][0]  # a conv whose norm is folded: the ReLU goes into the conv
        setattr(layer, conv_name, _fused_relu_layer(getattr(layer, conv_name)))
    return layer


def _fuse_declared_layers(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name in getattr(module, "relu_layers", ()):
            layers = getattr(module, name)
            if isinstance(layers, nn.ModuleList):
                for i, layer in enumerate(layers):
                    layers[i] = _fused_relu_layer(layer)
            else:
                setattr(module, name, _fused_relu_layer(layers))
        for name in getattr(module, "plain_layers", ()):
            if type(getattr(module, name)) is nn.Conv2d:
                setattr(module, name, FusedConv2d(getattr(module, name), relu=False))


def _split_part(part: nn.Module, mode: str, parent: nn.Module,
                dtype: torch.dtype) -> nn.Module:
    if mode == "input":
        return part.to(dtype)
    if mode == "bf16":
        return run_in(part, dtype, output_dtype=dtype)
    if mode == "bf16->fp32":
        return run_in(part, dtype, output_dtype=torch.float32)
    if mode == "refined" and len(getattr(part, "convs", ())) == 1:
        return RefinedRPNHead(part, refine_topk=parent.refine_topk, dtype=dtype)
    return Cast(part, input_dtype=torch.float32, output_dtype=torch.float32)


def _apply_split(model: nn.Module, split: Dict[str, str], dtype: torch.dtype) -> None:
    for path, mode in split.items():
        if mode not in SPLIT_MODES:
            raise ValueError(f"{type(model).__name__}.bf16_split[{path!r}] = {mode!r}; "
                             f"modes: {sorted(SPLIT_MODES)}")
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        part = getattr(parent, name, None)
        if part is None:  # an optional part this model was built without (an aux head)
            continue
        if isinstance(part, nn.ModuleList):  # each member on its own
            for i, member in enumerate(part):
                part[i] = _split_part(member, mode, parent, dtype)
        else:
            setattr(parent, name, _split_part(part, mode, parent, dtype))


@torch.no_grad()
def optimize_for_inference(model: nn.Module, *, precision: str = "fp32",
                           channels_last: bool = True, fuse: bool = True,
                           winograd: bool = True) -> nn.Module:
    """In place, for inference on ``model``'s device: eval mode, norms folded, with ``fuse``
    each ReLU and residual add inside its conv or linear layer (oneDNN post-ops on CPU; other
    devices run the plain ops), with ``fuse`` and ``winograd`` the float32 3x3 convs of 256
    channels or more as Winograd on CPU, channels-last layout, and at ``precision`` "bf16"
    (or "auto" on a CPU with native bf16) the model class's ``bf16_split``. bf16 on a CPU
    without it raises ``backbones.machine.PrecisionUnavailable``. Returns the model."""
    dtype = check_precision(precision, model_device(model))
    split = getattr(model, "bf16_split", None) or {}
    if dtype != torch.float32 and not split:
        raise ValueError(f"{type(model).__name__} declares no bf16_split; it runs in fp32")
    model.eval()
    fold_frozen_batchnorm(model)
    if fuse:
        fuse_conv_relu(model)
        _fuse_declared_layers(model)
    for module in model.modules():
        if hasattr(module, "use_channels_last"):
            module.use_channels_last()
    if dtype != torch.float32:
        _apply_split(model, split, dtype)
    if fuse and winograd:  # the convs left in float32
        use_winograd(model, float32_only=True)
    model.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    model.input_dtype = dtype
    model.input_channels_last = channels_last or dtype != torch.float32
    if model.input_channels_last:
        model.to(memory_format=torch.channels_last)
    return model
