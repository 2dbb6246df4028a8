"""Registries for the parts a config names by string, as detectron2's keys do:
``MODEL.ROI_HEADS.NAME``, ``MODEL.ROI_BOX_HEAD.NAME`` and ``MODEL.RPN.HEAD_NAME``. A part of
your own registers under a new name (in a module given to the tools with ``--import``) and
the config names it; an unknown name is an error that lists the known ones.

    from detection.modeling.registry import ROI_BOX_HEADS

    @ROI_BOX_HEADS.register("MyBoxHead")
    def my_box_head(cfg, in_channels):  # -> nn.Module with an ``out_dim`` attribute
        ...
"""

from typing import Callable, Dict, List, Optional, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """Names -> builders for the config key ``key``."""

    def __init__(self, key: str, signature: str) -> None:
        self.key, self.signature = key, signature
        self._builders: Dict[str, Callable] = {}

    def register(self, name: Optional[str] = None) -> Callable[[F], F]:
        def add(fn: F) -> F:
            registered = name or fn.__name__
            if registered in self._builders and self._builders[registered] is not fn:
                raise ValueError(f"{self.key} {registered!r} is registered already")
            self._builders[registered] = fn
            return fn
        return add

    def get(self, name: str) -> Callable:
        if name not in self._builders:
            raise ValueError(f"unknown {self.key} {name!r}; registered: {self.names()} (a "
                             f"part of your own registers with {self.key.split('.')[1]}'s "
                             f"registry in detection.modeling.registry)")
        return self._builders[name]

    def names(self) -> List[str]:
        return sorted(self._builders)


# MODEL.RPN.HEAD_NAME: (cfg, in_channels, num_anchors) -> RPN head
RPN_HEADS = Registry("MODEL.RPN.HEAD_NAME", "(cfg, in_channels, num_anchors)")
# MODEL.ROI_HEADS.NAME: (cfg, shapes, in_features, res5) -> the RoI heads' box head, or
# whole RoI heads (a StandardROIHeads, e.g. CascadeROIHeads)
ROI_HEADS = Registry("MODEL.ROI_HEADS.NAME", "(cfg, shapes, in_features, res5)")
# MODEL.ROI_BOX_HEAD.NAME: (cfg, in_channels) -> box head with ``out_dim``
ROI_BOX_HEADS = Registry("MODEL.ROI_BOX_HEAD.NAME", "(cfg, in_channels)")
