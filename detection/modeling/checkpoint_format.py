"""Which project's names a detector checkpoint uses, told from its keys in one place.

Each family contributes the key prefixes that mark each source format ("torchvision",
"detectron2", "ours") with ``register_format_marks``; ``detect_format(checkpoint, family)``
checks a checkpoint's keys against them, in the order they were registered. A checkpoint of
another family is named as such in the error (a Faster R-CNN file given to a RetinaNet config),
any other shows its first keys. A family whose checkpoints share another's names and add their
own (FCOS: RetinaNet's head plus a centerness branch) also declares the keys only its
checkpoints hold (``register_family_marks``): a checkpoint with one is that family's, one
without is not. ResNet backbone files have their own detection
(``backbones.convert.detect_format``), as they hold no detector keys.
"""

from typing import Any, Dict, List, Mapping, Tuple

__all__ = ["detect_format", "register_family_marks", "register_format_marks", "state_dict_of"]

# family -> [(format, key prefixes)], in the order they are tried
FORMAT_MARKS: Dict[str, List[Tuple[str, Tuple[str, ...]]]] = {}
# what a family's checkpoints are, in errors ("two-stage (R-CNN)")
_DESCRIPTIONS: Dict[str, str] = {}
# family -> key prefixes that only its checkpoints hold, in any format
FAMILY_MARKS: Dict[str, Tuple[str, ...]] = {}


def register_format_marks(family: str, fmt: str, *prefixes: str, description: str = "") -> None:
    """Checkpoints with a key starting with one of ``prefixes`` are in ``fmt`` for
    ``family``."""
    FORMAT_MARKS.setdefault(family, []).append((fmt, tuple(prefixes)))
    if description:
        _DESCRIPTIONS[family] = description


def register_family_marks(family: str, *prefixes: str) -> None:
    """Checkpoints with a key starting with one of ``prefixes`` belong to ``family`` and to
    no other; ``family``'s checkpoints always hold one."""
    FAMILY_MARKS[family] = FAMILY_MARKS.get(family, ()) + tuple(prefixes)


def _owner(keys: List[str]) -> Tuple[str, str]:
    """(the family whose own marks a key has, that key), or ("", "")."""
    for family, prefixes in FAMILY_MARKS.items():
        for k in keys:
            if k.startswith(prefixes):
                return family, k
    return "", ""


def state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict of a checkpoint (``{"model": state_dict, ...}``) or the dict itself."""
    sd = checkpoint.get("model", checkpoint)
    if not isinstance(sd, Mapping):
        raise TypeError(f"a checkpoint holds a state dict (or {{'model': state_dict}}), got "
                        f"{type(sd).__name__}")
    return sd


def _match(keys: List[str], family: str) -> str:
    return _marked(keys, family)[0]


def _marked(keys: List[str], family: str) -> Tuple[str, str]:
    """(format, the first key that marks it) for ``family``, or ("", "")."""
    for fmt, prefixes in FORMAT_MARKS.get(family, []):
        for k in keys:
            if k.startswith(prefixes):
                return fmt, k
    return "", ""


def detect_format(checkpoint: Mapping[str, Any], family: str) -> str:
    """The format of a ``family`` checkpoint, from its keys; a ValueError says what else it
    looks like."""
    from . import convert, fcos_convert, retinanet_convert  # noqa: F401  (families' marks)

    keys = list(state_dict_of(checkpoint))
    owner, owner_key = _owner(keys)
    if owner and owner != family:
        raise ValueError(f"this is a {_DESCRIPTIONS.get(owner, owner)} checkpoint (key "
                         f"{owner_key!r}), not a {_DESCRIPTIONS.get(family, family)} one; use "
                         f"a config of its family (MODEL.META_ARCHITECTURE: {owner})")
    fmt = _match(keys, family) if owner == family or family not in FAMILY_MARKS else ""
    if fmt:
        return fmt
    for other in FORMAT_MARKS:
        if other in FAMILY_MARKS and other != owner:
            continue  # its shared names alone do not make a checkpoint its own
        other_fmt, key = _marked(keys, other)
        if other != family and other_fmt:
            what = _DESCRIPTIONS.get(other, other)
            raise ValueError(f"this is a {what} checkpoint ({other_fmt} format, key {key!r}), "
                             f"not a {_DESCRIPTIONS.get(family, family)} one; use a config of "
                             f"its family (MODEL.META_ARCHITECTURE: {other})")
    raise ValueError(f"not a {_DESCRIPTIONS.get(family, family)} checkpoint in any known "
                     f"format; keys begin {keys[:3]}")
