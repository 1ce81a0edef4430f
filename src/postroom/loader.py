"""Find a user's Router from an import string such as ``billing.consumers:router``."""

from __future__ import annotations

import importlib
import os
import sys

from postroom.errors import ConfigError
from postroom.router import Router


def load_router(spec: str) -> Router:
    """Import ``module:attribute`` and return it, or raise ConfigError saying what failed."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{spec!r} is not of the form module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current project is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    if not hasattr(module, attribute):
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r} (in {spec!r})")
    router = getattr(module, attribute)
    if not isinstance(router, Router):
        raise ConfigError(f"{spec!r} is {type(router).__name__}, not a postroom Router")
    if not len(router):
        raise ConfigError(f"{spec!r} has no consumers")
    return router
