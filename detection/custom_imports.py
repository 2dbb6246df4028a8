"""Your own code from the tools and configs, without a launcher script.

Every tool takes ``--import MODULE`` (repeatable), and a config may list modules in
``CUSTOM_IMPORTS`` (mmdetection's ``custom_imports``). Each is imported before the model is
built, so a backbone (``@backbones.register_backbone``), a model family
(``detection.families.register_family``) or a dataset (``detection.data.register_coco_instances``)
that it registers can be named from YAML. ``MODULE`` is a module name, found on ``sys.path`` or
in the current folder, or a path to a ``.py`` file. ``--import`` runs while the command line is
parsed, before the config is read, so a module imported that way may also add config keys;
``CUSTOM_IMPORTS`` runs after the config is merged.
"""

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, List

logger = logging.getLogger(__name__)


def import_module(name: str, *, source: str = "--import") -> ModuleType:
    """Import ``name`` (a module name or a ``.py`` path); an ``ImportError`` names it and
    ``source`` (where it was asked for)."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ImportError(f"{source} {name}: no such file")
        module_name = path.stem
        if module_name in sys.modules and getattr(sys.modules[module_name], "__file__",
                                                  None) == str(path):
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:  # a tool's sys.path[0] is tools/
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.split(".")[0] and e.name != name:
            raise  # the module exists; something it imports does not
        raise ImportError(f"{source} {name}: no module named {name!r} on sys.path or in "
                          f"{os.getcwd()} (give a .py path instead)") from e


def import_modules(names: Iterable[str], *, source: str = "--import") -> List[ModuleType]:
    modules = [import_module(str(n), source=source) for n in names]
    if modules:
        logger.info("Imported %s (%s)", ", ".join(m.__name__ for m in modules), source)
    return modules


class _ImportAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        import_module(values)
        # a new list: appending to the default would carry one parse's imports into the next
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), values])


def add_import_argument(parser: argparse.ArgumentParser) -> None:
    """``--import MODULE`` (repeatable) on a tool's parser: imported as it is parsed."""
    parser.add_argument("--import", dest="imports", action=_ImportAction, default=[],
                        metavar="MODULE",
                        help="import a module (name or .py path) that registers your own "
                             "backbone, model family or dataset; repeatable")
