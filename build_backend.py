"""PEP 517 backend: setuptools' own, plus what mypyc needs when TERAPROXY_MYPYC=1 (setup.py).

mypyc type-checks the modules it compiles, so besides mypy it needs the packages they import (the
project's own dependencies, read from pyproject.toml so the list lives in one place). A pure build
asks for nothing beyond pyproject's build-system requires. setuptools' own hooks are not called here:
they would run setup.py, which imports mypyc, before these requirements are installed (and they add
nothing since setuptools 70.1).
"""

import os
import tomllib
from typing import Any

from setuptools.build_meta import *  # noqa: F403  (the hooks this module does not change)

MYPYC = ["mypy==2.4.1", "types-PyYAML"]  # pinned: mypyc compiles only what this mypy passes as --strict


def _mypyc_requires() -> list[str]:
    if os.environ.get("TERAPROXY_MYPYC") != "1":
        return []
    with open("pyproject.toml", "rb") as f:
        return [*MYPYC, *tomllib.load(f)["project"]["dependencies"]]


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    return _mypyc_requires()


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
    return _mypyc_requires()
