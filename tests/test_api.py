"""The public surface: small, complete, and cheap to import in a web process."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import postroom


def test_all_names_exist_and_are_public():
    assert sorted(postroom.__all__) == sorted(set(postroom.__all__))
    for name in postroom.__all__:
        assert hasattr(postroom, name), name


def test_all_is_complete():
    """Every public name the package binds (submodules aside) is listed in ``__all__``."""
    bound = {
        name
        for name, value in vars(postroom).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert bound - set(postroom.__all__) == set(), "public names missing from __all__"


def test_importing_postroom_does_not_load_the_broker_client():
    code = "import sys, postroom; print(any(m.split('.')[0] in ('aio_pika', 'aiormq') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
