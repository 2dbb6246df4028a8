"""The configuration system: one defaults tree defined in code, YAML overrides, validation.

``get_cfg()`` returns a fresh copy of the defaults. YAML files override it and may inherit
through ``_BASE_`` (a path relative to the file, or a list of them); ``merge_from_list`` takes
command-line ``KEY VALUE`` pairs. Every merge is validated:

- an unknown key raises :class:`ConfigKeyError` naming the key, the file it came from and the
  closest valid key;
- a value of the wrong type raises :class:`ConfigTypeError` naming the key, the expected type
  and the value. An int given for a float key is converted, a list for a tuple key too.

The defaults live in :mod:`detection.defaults` (all of detection's keys, one tree). Packages
above detection add theirs explicitly, in their own ``get_cfg()`` (``segmentation.config``);
``load_config(..., cfg=segmentation.config.get_cfg())`` loads a config of theirs, and a key of
theirs met by detection's tree alone is an error that says which package declares it.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

__all__ = [
    "CfgNode",
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "get_cfg",
    "load_config",
    "resolve_config_path",
    "save_config",
]

logger = logging.getLogger(__name__)

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A configuration could not be loaded or merged."""


class ConfigKeyError(ConfigError, KeyError):
    """A key that the defaults tree does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(ConfigError, TypeError):
    """A value whose type does not match the default's."""


def _source_suffix(source: str | None) -> str:
    return f" (from {source})" if source else ""


def _all_keys(node: _FvCfgNode, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        if isinstance(v, _FvCfgNode):
            keys.extend(_all_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _type_name(v: Any) -> str:
    return type(v).__name__


def _coerce(full_key: str, default: Any, value: Any, source: str | None) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise ConfigTypeError."""
    if value is None or default is None:
        return value

    def fail() -> ConfigTypeError:
        return ConfigTypeError(
            f"Config key '{full_key}' expects {_type_name(default)} "
            f"(default {default!r}), got {_type_name(value)} {value!r}{_source_suffix(source)}"
        )

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise fail()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(default, (list, tuple)):
        if isinstance(value, str) and value.strip()[:1] in "([":
            # detectron2's YAML files write tuples as Python literals: ("coco_2017_train",)
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise fail() from None
        if not isinstance(value, (list, tuple)):
            raise fail()
        templates = {type(x) for x in default}
        if len(default) > 0 and len(templates) == 1:
            template = default[0]
            items = [_coerce(f"{full_key}[{i}]", template, x, source) for i, x in enumerate(value)]
        else:
            items = list(value)
        return type(default)(items)
    if type(default) is not type(value):
        raise fail()
    return value


def _has_key(root: _FvCfgNode, dotted: str) -> bool:
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, _FvCfgNode) or part not in node:
            return False
        node = node[part]
    return True


def _declared_elsewhere(root: _FvCfgNode, full_key: str) -> str | None:
    """The hint for a key that this tree renamed, or that another package declares and this
    tree lacks."""
    from detection.defaults import KEYS_DECLARED_ABOVE, RENAMED_KEYS

    if full_key in RENAMED_KEYS:
        return f" Use {RENAMED_KEYS[full_key]}."
    for prefix, package in KEYS_DECLARED_ABOVE.items():
        if (full_key == prefix or full_key.startswith(prefix + ".")) and not _has_key(root,
                                                                                       prefix):
            return (f" It is a key of the `{package}` package: load this config with "
                    f"`{package}.config.load_config(...)` (or merge it into "
                    f"`{package}.config.get_cfg()`), as the tools do.")
    return None


def _unknown_key_error(root: _FvCfgNode, full_key: str, source: str | None) -> ConfigKeyError:
    elsewhere = _declared_elsewhere(root, full_key)
    if elsewhere is not None:
        return ConfigKeyError(f"Unknown config key '{full_key}'{_source_suffix(source)}."
                              + elsewhere)
    valid = _all_keys(root)
    close = difflib.get_close_matches(full_key, valid, n=3, cutoff=0.6)
    if not close:  # compare the last component within the same parent node
        parent, _, leaf = full_key.rpartition(".")
        siblings = [k for k in valid if k.rpartition(".")[0] == parent]
        close = [
            f"{parent}.{m}" if parent else m
            for m in difflib.get_close_matches(
                leaf, [k.rpartition(".")[2] for k in siblings], n=3, cutoff=0.5
            )
        ]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if len(close) > 1:
        hint += " Other close keys: " + ", ".join(f"'{c}'" for c in close[1:]) + "."
    return ConfigKeyError(f"Unknown config key '{full_key}'{_source_suffix(source)}.{hint}")


def _merge_dict(
    root: _FvCfgNode,
    node: _FvCfgNode,
    data: dict,
    prefix: str,
    origins: dict[str, str],
    default_source: str | None,
) -> None:
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        source = origins.get(full_key, default_source)
        if key == BASE_KEY:
            raise ConfigError(f"'{BASE_KEY}' may only appear at the top of a YAML file")
        if key not in node:
            if node.is_new_allowed():
                node[key] = type(node)(value) if isinstance(value, dict) else value
                continue
            raise _unknown_key_error(root, full_key, source)
        default = node[key]
        if isinstance(default, _FvCfgNode):
            if not isinstance(value, dict):
                raise ConfigTypeError(
                    f"Config key '{full_key}' is a group of keys; got {_type_name(value)} "
                    f"{value!r}{_source_suffix(source)}"
                )
            _merge_dict(root, default, value, full_key + ".", origins, default_source)
        else:
            if isinstance(value, str) and default is not None and not isinstance(default, str):
                # YAML leaves "(640, 672)" or "1e-4" as strings; read them as Python literals
                value = _parse_cli_value(value)
            node[key] = _coerce(full_key, default, value, source)


def _deep_merge(src: dict, dst: dict, origins: dict[str, str], source: str, prefix: str) -> None:
    for k, v in src.items():
        full_key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(v, dst[k], origins, source, full_key + ".")
        else:
            dst[k] = v
            _record_origin(v, origins, source, full_key)


def _record_origin(value: Any, origins: dict[str, str], source: str, full_key: str) -> None:
    origins[full_key] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record_origin(v, origins, source, f"{full_key}.{k}")


def _load_yaml_with_base(
    path: str | os.PathLike, _stack: tuple[str, ...] = ()
) -> tuple[dict, dict[str, str]]:
    """Load ``path`` and its ``_BASE_`` chain; return (merged dict, dotted key -> file)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if path in _stack:
        raise ConfigError("Cyclic _BASE_ chain: " + " -> ".join([*_stack, path]))
    if not os.path.isfile(path):
        via = f" (the _BASE_ of {_stack[-1]})" if _stack else ""
        raise ConfigError(f"Config file not found: {path}{via}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"Cannot parse config file {path}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {_type_name(data)}")
    bases = data.pop(BASE_KEY, None)
    merged: dict = {}
    origins: dict[str, str] = {}
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else list(bases):
            base_path = os.path.expanduser(str(base))
            if not os.path.isabs(base_path):
                base_path = os.path.join(os.path.dirname(path), base_path)
            base_data, base_origins = _load_yaml_with_base(base_path, (*_stack, path))
            _deep_merge(base_data, merged, origins, "", "")
            origins.update(base_origins)
    _deep_merge(data, merged, origins, path, "")
    return merged, origins


def _parse_cli_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class CfgNode(_FvCfgNode):
    """fvcore's CfgNode with validated merges (named keys, suggestions, type coercion)."""

    def _check_not_frozen(self) -> None:
        if self.is_frozen():
            raise ConfigError("Cannot merge into a frozen config; call cfg.defrost() first")

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        """Merge a YAML file (and its ``_BASE_`` chain) into this config."""
        self._check_not_frozen()
        data, origins = _load_yaml_with_base(cfg_filename)
        _merge_dict(self, self, data, "", origins, os.path.abspath(cfg_filename))

    def merge_from_other_cfg(self, cfg_other: _FvCfgNode) -> None:  # type: ignore[override]
        """Merge another config (or plain nested dict) into this one, validated."""
        self._check_not_frozen()
        _merge_dict(self, self, dict(cfg_other), "", {}, None)

    def merge_from_list(self, cfg_list: list) -> None:  # type: ignore[override]
        """Merge ``["SOLVER.BASE_LR", "0.01", ...]``; values are parsed as Python literals."""
        self._check_not_frozen()
        if len(cfg_list) % 2 != 0:
            raise ConfigError(f"Overrides must be KEY VALUE pairs; got an odd list {cfg_list!r}")
        for full_key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            value: Any = _parse_cli_value(raw)
            for part in reversed(str(full_key).split(".")):
                value = {part: value}
            _merge_dict(self, self, value, "", {}, "command line")


def get_cfg() -> CfgNode:
    """A fresh copy of detection's defaults tree (:mod:`detection.defaults`): data, solver,
    test and model keys. Packages above detection extend it in their own ``get_cfg``
    (``segmentation.config.get_cfg()``)."""
    from detection.defaults import detection_defaults

    return detection_defaults()


def _configs_dirs() -> list[Path]:
    dirs = [Path(__file__).resolve().parent.parent / "configs", Path.cwd() / "configs"]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def resolve_config_path(name: str | os.PathLike) -> Path:
    """Find a config file: an existing path, else a name inside the repo's ``configs/`` folder.

    ``faster_rcnn_r50_fpn.yaml`` and ``torchvision/fasterrcnn_resnet50_fpn.yaml`` resolve against
    ``configs/`` next to the package and then under the current directory; ``.yaml`` may be
    omitted. Raises FileNotFoundError listing near matches.
    """
    p = Path(os.path.expanduser(os.fspath(name)))
    if p.is_file():
        return p.resolve()
    dirs = _configs_dirs()
    rel = str(name)
    if rel.startswith("configs/"):
        rel = rel[len("configs/") :]
    candidates = [rel] if rel.endswith((".yaml", ".yml")) else [rel, rel + ".yaml"]
    for d in dirs:
        for c in candidates:
            if (d / c).is_file():
                return (d / c).resolve()
    known = sorted({str(f.relative_to(d)) for d in dirs for f in d.rglob("*.y*ml")})
    close = difflib.get_close_matches(rel, known, n=5, cutoff=0.4)
    if not close:
        base = Path(rel).name
        close = [k for k in known if base in k or Path(k).stem in base][:5]
    where = ", ".join(str(d) for d in dirs) or "(no configs/ folder found)"
    hint = (" Near matches: " + ", ".join(close) + ".") if close else ""
    raise FileNotFoundError(f"Config '{name}' is neither a file nor under {where}.{hint}")


def load_config(name: str | os.PathLike | None = None, opts: Iterable[str] = (), *,
                cfg: CfgNode | None = None) -> CfgNode:
    """Defaults (``cfg``, else detection's ``get_cfg()``), then the YAML file ``name``
    (resolved), then ``KEY VALUE`` overrides. Returns the merged config.

    A key given in ``opts`` is dropped from ``SOLVER.AMP.FALLBACK_OPTS`` (the recipe merged
    later where mixed precision cannot run): the command line wins over the file's recipe."""
    cfg = get_cfg() if cfg is None else cfg
    if name is not None:
        cfg.merge_from_file(str(resolve_config_path(name)))
    opts = list(opts)
    if opts:
        cfg.merge_from_list(opts)
        fallback = list(cfg.SOLVER.AMP.get("FALLBACK_OPTS", [])) if "SOLVER" in cfg else []
        given = set(opts[::2]) - {"SOLVER.AMP.FALLBACK_OPTS"}
        if fallback and len(fallback) % 2 == 0 and given & set(fallback[::2]):
            kept = [x for k, v in zip(fallback[::2], fallback[1::2]) if k not in given
                    for x in (k, v)]
            frozen = cfg.is_frozen()
            cfg.defrost()
            cfg.SOLVER.AMP.FALLBACK_OPTS = kept
            if frozen:
                cfg.freeze()
    if cfg.get("CUSTOM_IMPORTS"):
        from detection.custom_imports import import_modules

        import_modules(cfg.CUSTOM_IMPORTS, source="CUSTOM_IMPORTS")
    return cfg


def save_config(cfg: _FvCfgNode, output_dir: str | os.PathLike) -> Path:
    """Write the merged config to ``output_dir/config.yaml`` atomically; return its path."""
    from detection.atomic_files import atomic_write_text

    path = atomic_write_text(Path(output_dir) / "config.yaml", cfg.dump())
    return path
