"""Reading a weights file into a name -> tensor dict without running code from it."""

import os
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import torch

from ..convert import StateDict, to_tensors
from ..pickle_safe import safe_load


def _unwrap(obj: Any) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
    """The parameter mapping inside a checkpoint and its other top-level entries."""
    meta: Dict[str, Any] = {}
    while isinstance(obj, Mapping):
        inner = next((k for k in ("blobs", "model", "state_dict") if isinstance(
            obj.get(k), Mapping)), None)
        if inner is None:
            break
        meta.update({k: v for k, v in obj.items() if k != inner and isinstance(v, (str, int))})
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint should hold a name -> array mapping, got "
                         f"{type(obj).__name__}")
    return obj, meta


def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[StateDict, Dict[str, Any]]:
    """Read a weights file without running code from it: ``.safetensors`` with safetensors,
    ``.pkl`` with the restricted unpickler (latin-1), anything else with
    ``torch.load(weights_only=True)``. Returns (name -> tensor, metadata such as
    ``__author__``); Caffe2 ``*_momentum`` blobs are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), {}
        if suffix in (".pkl", ".pickle"):
            raw: Any = safe_load(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"cannot read weights file {path}: {err}") from err
    params, meta = _unwrap(raw)
    params = {k: v for k, v in params.items() if not str(k).endswith("_momentum")}
    return to_tensors(params), meta


# Prefixes under which a detector (detectron2, torchvision, our FPN) keeps its ResNet body.
_BODY_PREFIXES = ("backbone.bottom_up.", "backbone.body.", "bottom_up.", "backbone.")


def select_body(state_dict: StateDict) -> Tuple[StateDict, int]:
    """Strip a DDP ``module.`` prefix and keep only a detector checkpoint's backbone body.
    Returns (body params, number of other keys dropped)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    for prefix in _BODY_PREFIXES:
        body = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if body:
            return body, len(state_dict) - len(body)
    return state_dict, 0
