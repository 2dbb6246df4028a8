"""Backbones by name: what a config's ``MODEL.BACKBONE.NAME`` looks up.

    from backbones import register_backbone

    @register_backbone
    def my_net(*, weights=None, out_features=None, **options) -> Backbone:
        ...

    build_backbone("my_net", out_features=["res4"])

A builder is any callable taking keyword options and returning a ``Backbone`` (``forward`` ->
dict of named maps, ``output_shape()``). Registering happens when the module defining it is
imported.
"""

import difflib
from typing import Callable, Dict, List, Optional, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Optional[Builder] = None, *, name: Optional[str] = None):
    """Register ``fn`` under ``name`` (default: its ``__name__``); usable as ``@register_backbone``
    or ``@register_backbone(name="...")``. Registering a second builder under a taken name is
    an error; registering the same function again is allowed (a re-imported module)."""

    def add(f: Builder) -> Builder:
        key = name or f.__name__
        old = _BUILDERS.get(key)
        if old is not None and _origin(old) != _origin(f):
            raise ValueError(f"a backbone named {key!r} is already registered ({old!r})")
        _BUILDERS[key] = f
        return f

    return add(fn) if fn is not None else add


def _origin(f: Callable) -> tuple:
    return getattr(f, "__module__", None), getattr(f, "__qualname__", None)


def list_backbones() -> List[str]:
    """Registered backbone names, sorted."""
    return sorted(_BUILDERS)


def get_backbone_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; the KeyError lists the valid names."""
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown backbone {name!r}.{hint} Valid backbones: "
                       f"{', '.join(list_backbones())} (a backbone of your own is registered "
                       "with @backbones.register_backbone when its module is imported)")
    return _BUILDERS[name]


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone by name with keyword options."""
    return get_backbone_builder(name)(**kwargs)
