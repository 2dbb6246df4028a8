"""Datasets registered by name: a loader that returns records, and metadata.

Built-in names:

- ``coco_2017_train``, ``coco_2017_val``, ``coco_2017_test-dev`` (image info only, no
  annotations), ``keypoints_coco_2017_train``, ``keypoints_coco_2017_val`` (the person
  keypoints) under ``<root>/coco/``, where root is :func:`set_datasets_root`'s value, else
  ``$DETKIT_DATASETS``, else ``./datasets``; resolved when the dataset is loaded.
- ``shapes_train``, ``shapes_val``: the synthetic shapes set (:mod:`detection.data.shapes`),
  generated on first use under ``$DETKIT_CACHE`` or ``~/.cache/detkit/shapes``.
- ``shapes_keypoints_train``, ``shapes_keypoints_val``: quadrilaterals with their corners as
  keypoints (:mod:`detection.data.shapes_keypoints`), generated on first use in the same cache;
  their metadata adds ``keypoint_oks_sigmas``.

Any COCO-format json works without code by naming it ``JSON_FILE:IMAGE_DIR`` (for example
``DATASETS.TRAIN ("data/train.json:data/images",)``): such a name registers itself on first use.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Callable

from detection.data.coco import load_coco_json, metadata_from_categories, read_coco_json

__all__ = [
    "DatasetCatalog",
    "datasets_root",
    "get_metadata",
    "register_coco_instances",
    "register_dataset",
    "set_datasets_root",
]

_LOADERS: dict[str, Callable[[], list[dict]]] = {}
_METADATA: dict[str, dict[str, Any]] = {}
_METADATA_LOADERS: dict[str, Callable[[], dict[str, Any]]] = {}
_ROOT_OVERRIDE: str | None = None


def set_datasets_root(root: str | os.PathLike | None) -> None:
    """Root of the built-in COCO datasets (``cfg.DATASETS.ROOT``); None/"" restores the default
    (``$DETKIT_DATASETS``, else ``./datasets``). Metadata read under another root is dropped."""
    global _ROOT_OVERRIDE
    root = os.fspath(root) if root else None
    if root != _ROOT_OVERRIDE:
        for name in _METADATA_LOADERS:  # read again, from the new root, when next asked
            _METADATA.pop(name, None)
    _ROOT_OVERRIDE = root


def datasets_root() -> Path:
    """The root folder of built-in datasets now in effect."""
    return Path(_ROOT_OVERRIDE or os.environ.get("DETKIT_DATASETS") or "./datasets").expanduser()


def _register_path_name(name: str) -> bool:
    """Register ``JSON_FILE:IMAGE_DIR`` on first use; True when ``name`` has that form."""
    json_part, sep, image_dir = name.rpartition(":")
    if not sep or not json_part.endswith(".json"):
        return False
    if not Path(json_part).expanduser().is_file():
        raise FileNotFoundError(f"Dataset '{name}': json file {json_part} does not exist")
    if not Path(image_dir).expanduser().is_dir():
        raise FileNotFoundError(f"Dataset '{name}': image folder {image_dir} does not exist")
    register_coco_instances(name, Path(json_part).expanduser(), Path(image_dir).expanduser())
    return True


def _unknown(name: str) -> KeyError:
    close = difflib.get_close_matches(name, list(_LOADERS), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"Dataset '{name}' is not registered.{hint} Registered: {sorted(_LOADERS)}; "
                    "or name a COCO json and its image folder as 'JSON_FILE:IMAGE_DIR'")


def register_dataset(
    name: str,
    loader: Callable[[], list[dict]],
    metadata: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Register ``loader`` (returns records) under ``name``; metadata: a dict or a callable."""
    if not callable(loader):
        raise TypeError(f"loader for dataset '{name}' must be callable")
    _LOADERS[name] = loader
    _METADATA.pop(name, None)
    _METADATA_LOADERS.pop(name, None)
    if callable(metadata):
        _METADATA_LOADERS[name] = metadata
    else:
        _METADATA[name] = dict(metadata or {})


def _coco_metadata(json_file: Callable[[], Path], image_root: Callable[[], Path]) -> dict:
    jf = json_file()
    # kept for the records built next from the same json (one parse per start)
    meta = metadata_from_categories(read_coco_json(jf, keep=True).get("categories", []))
    meta.update(json_file=str(Path(jf).resolve()), image_root=str(Path(image_root()).resolve()))
    meta["evaluator_type"] = "coco"
    return meta


def register_coco_instances(
    name: str,
    json_file: str | os.PathLike | Callable[[], Path],
    image_root: str | os.PathLike | Callable[[], Path],
    metadata: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Register a COCO-format json + image folder.

    Paths may be callables, resolved at load time. ``metadata`` (or what it returns) is added
    to the metadata read from the json.
    """
    jf = json_file if callable(json_file) else (lambda p=Path(json_file): p)
    ir = image_root if callable(image_root) else (lambda p=Path(image_root): p)

    def extra() -> dict:
        return dict(metadata() if callable(metadata) else (metadata or {}))

    def load() -> list[dict]:
        records, meta = load_coco_json(jf(), ir(), name)
        meta.update(extra())
        _METADATA[name] = meta  # saves parsing the json again in get_metadata
        return records

    def load_meta() -> dict:
        meta = _coco_metadata(jf, ir)
        meta.update(extra(), name=name)
        return meta

    register_dataset(name, load, load_meta)


class DatasetCatalog:
    """Name -> records. ``DatasetCatalog.get(name)`` loads (fresh lists each call)."""

    @staticmethod
    def get(name: str) -> list[dict]:
        if name not in _LOADERS and not _register_path_name(name):
            raise _unknown(name)
        return _LOADERS[name]()

    @staticmethod
    def list() -> list[str]:
        return sorted(_LOADERS)

    @staticmethod
    def remove(name: str) -> None:
        _LOADERS.pop(name, None)
        _METADATA.pop(name, None)
        _METADATA_LOADERS.pop(name, None)

    register = staticmethod(register_dataset)


def get_metadata(name: str) -> dict[str, Any]:
    """Metadata of a registered dataset (``thing_classes``, id maps, json_file, ...); a copy."""
    if name not in _LOADERS and not _register_path_name(name):
        raise _unknown(name)
    if name not in _METADATA and name in _METADATA_LOADERS:
        _METADATA[name] = _METADATA_LOADERS[name]()
    return copy.deepcopy(_METADATA.get(name, {"name": name}))


def _register_builtins() -> None:
    coco_splits = {
        "coco_2017_train": ("annotations/instances_train2017.json", "train2017"),
        "coco_2017_val": ("annotations/instances_val2017.json", "val2017"),
        "coco_2017_test-dev": ("annotations/image_info_test-dev2017.json", "test2017"),
        "keypoints_coco_2017_train": ("annotations/person_keypoints_train2017.json", "train2017"),
        "keypoints_coco_2017_val": ("annotations/person_keypoints_val2017.json", "val2017"),
    }
    for name, (json_rel, img_rel) in coco_splits.items():
        register_coco_instances(
            name,
            lambda j=json_rel: datasets_root() / "coco" / j,
            lambda i=img_rel: datasets_root() / "coco" / i,
        )

    from detection.data import shapes

    for split in ("train", "val"):

        def part(attr: str, s: str = split) -> Path:
            return getattr(shapes.ensure_shapes_dataset(), f"{s}_{attr}")

        def sem_meta(p: Callable[[str], Path] = part) -> dict:
            return {
                "sem_seg_root": str(p("sem_seg")),
                "stuff_classes": ["background", *shapes.SHAPES_CLASSES],
                "ignore_label": shapes.SHAPES_IGNORE_LABEL,
            }

        register_coco_instances(
            f"shapes_{split}",
            lambda p=part: p("json"),
            lambda p=part: p("images"),
            metadata=sem_meta,
        )
        coco_loader = _LOADERS[f"shapes_{split}"]

        def load_with_sem_seg(
            load: Callable[[], list[dict]] = coco_loader, p: Callable[[str], Path] = part
        ) -> list[dict]:
            records = load()
            sem_root = p("sem_seg")
            for r in records:  # the semantic label map of each image, for segmentation
                r["sem_seg_file_name"] = str(sem_root / (Path(r["file_name"]).stem + ".png"))
            return records

        _LOADERS[f"shapes_{split}"] = load_with_sem_seg

    from detection.data import shapes_keypoints

    for split in ("train", "val"):

        def kp_part(attr: str, s: str = split) -> Path:
            return getattr(shapes_keypoints.ensure_shapes_keypoints_dataset(), f"{s}_{attr}")

        register_coco_instances(
            f"shapes_keypoints_{split}",
            lambda p=kp_part: p("json"),
            lambda p=kp_part: p("images"),
            metadata={"keypoint_oks_sigmas": list(shapes_keypoints.KEYPOINT_OKS_SIGMAS)},
        )


_register_builtins()
