"""Find a user's Router from an import string such as ``billing.consumers:router``."""

from __future__ import annotations

import importlib
import os
import sys

from postroom.errors import ConfigError
from postroom.router import Router


def load_router(spec: str, *, app_dir: str | None = None) -> Router:
    """Import ``module:attribute`` and return it, or raise ConfigError saying what failed.

    The module is looked up first in *app_dir* (default: the current directory, like
    ``python -m``), then on the usual ``sys.path``: ``--app-dir src`` for a project whose
    packages live under ``src/``.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{spec!r} is not of the form module:attribute")
    directory = os.path.abspath(app_dir if app_dir is not None else os.getcwd())
    if not os.path.isdir(directory):
        raise ConfigError(f"--app-dir {app_dir!r} is not a directory")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} from {directory} or the installed packages: {exc} "
            "(run from the folder holding it, or pass --app-dir)"
        ) from None
    if not hasattr(module, attribute):
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r} (in {spec!r})")
    router = getattr(module, attribute)
    if not isinstance(router, Router):
        raise ConfigError(f"{spec!r} is {type(router).__name__}, not a postroom Router")
    if not len(router):
        raise ConfigError(f"{spec!r} has no consumers")
    return router
