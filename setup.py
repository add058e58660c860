"""The optional compiled build: `KEYPROXY_COMPILE=1 pip install .` (or `pip wheel .`).

Without the variable keyproxy is a plain Python package, described by pyproject.toml
alone. With it, the modules every request runs through are compiled to C extensions
by mypyc, from the same type-annotated source: the full policy then costs ~20 % less
CPU per request (`bench/RESULTS.md`). It needs a C compiler. The Dockerfile builds
its image this way; `tests/test_compiled_build.py` builds the same wheel and serves
traffic with it.

Compiled, a module's annotations are enforced at run time and its classes cannot be
subclassed from Python or rebuilt by pickle, so the list stops short of what a reload
parses in a child process and pickles (`keyproxy.config.handoff`: the route table,
allowlists, CORS and field filters), and of everything run once rather than per request.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

#: The request path, from the socket to the access log.
COMPILED = (
    "keyproxy/app.py",
    "keyproxy/observe.py",
    "keyproxy/wire/*.py",
    "keyproxy/checks/*.py",
    "keyproxy/ratelimit/memory.py",
    "keyproxy/ratelimit/redis.py",
    "keyproxy/ratelimit/redis_batch.py",
    "keyproxy/forward/plan.py",
    "keyproxy/response/links.py",
    "keyproxy/response/body_links.py",
    "keyproxy/response/body_scrub.py",
    "keyproxy/response/chain.py",
    "keyproxy/response/headers.py",
    "keyproxy/response/errors.py",
)


def compiled_modules() -> list[str]:
    return sorted(
        str(path.relative_to(ROOT))
        for pattern in COMPILED
        for path in ROOT.glob(pattern)
        if path.name != "__init__.py"
    )


def build_requirements() -> list[str]:
    """mypy, and what it must see to compile keyproxy as it type-checks it: the runtime
    dependencies and the stubs of the test extra (`types-*`), from pyproject.toml. A
    build environment holds only what the build asks for (`python:3.12-slim` in the
    Dockerfile has none of them), and mypy refuses imports it cannot resolve."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stubs = [name for name in project["optional-dependencies"]["test"] if name.startswith("types-")]
    return ["mypy>=1.10", *project["dependencies"], *stubs]


if os.environ.get("KEYPROXY_COMPILE") != "1":
    setup()
elif "editable_wheel" in sys.argv:
    sys.exit(
        "KEYPROXY_COMPILE=1 needs a regular install (pip install .): in an editable one "
        "the compiled modules would hide later edits to their source"
    )
else:
    try:
        from mypyc.build import mypycify
    except ImportError:
        # A PEP 517 front end first asks for the build's requirements: naming them here
        # has pip install them into the build environment and run this file again.
        setup(setup_requires=build_requirements())
    else:
        setup(
            ext_modules=mypycify(compiled_modules(), opt_level="3", multi_file=True),
            options={"build_ext": {"parallel": os.cpu_count() or 1}},
        )
