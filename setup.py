"""The hot path compiled with mypyc when TERAPROXY_MYPYC=1 (README: Install); otherwise a pure-Python package.

teraproxy.COMPILED lists the modules: plain, mypy --strict Python that mypyc turns into C extensions
with the same behaviour (~17% fewer CPU instructions per request, ~20% per rewritten stream: README's
benchmarks). Left interpreted: what subclasses aiohttp's classes (app, edge), the CLI, config loading
and the sim.
"""

import os
import sys

from setuptools import setup

from teraproxy import COMPILED  # the package's __init__ imports nothing else

ext_modules = []
# metadata and the sdist need no extensions (and would run mypy once more; their build env has none)
if os.environ.get("TERAPROXY_MYPYC") == "1" and not {"sdist", "egg_info", "dist_info"} & set(sys.argv[1:]):
    from mypyc.build import mypycify

    ext_modules = mypycify([f"teraproxy/{m}.py" for m in COMPILED], opt_level="3",
                           group_name="teraproxy._native")

setup(ext_modules=ext_modules)
