"""The compiled build (setup.py, `KEYPROXY_COMPILE=1`) measured against the Python one.

Why: the full policy runs ~3,250 Python bytecodes per request (`datapath.py --opcodes`)
at ~13 ns each, and pure-Python work has been cut to where each further step saves
tenths of a µs. The compiled build runs the same type-annotated request path as C
extensions made by mypyc; this script shows what that buys, on this machine.

What it does, in a copy of the working tree (`--tree`, default bench/out/compiled-tree):
1. compiles there what setup.py lists (`setup.py build_ext --inplace`);
2. prints the data path's CPU per request (`datapath.py --full`) of the copy and of
   this tree, alternating, best of each;
3. given `--` and `run.py` arguments, runs the copy's `bench/run.py` with them: its
   keyproxy targets then serve compiled (its report says how many modules are).

Needs a C compiler and mypy (the test extras). Usage:

    python bench/compiled.py
    python bench/compiled.py -- --targets plain,keyproxy-full,nginx-proxy --bodies small
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


class CompileError(Exception):
    """One line saying what to fix."""


def copy_tree(tree: Path) -> None:
    """The working tree's tracked files, as they are now (uncommitted edits included)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=False
    )
    if listed.returncode != 0:
        raise CompileError("not a git checkout: run this from keyproxy's repository")
    if tree.exists():
        shutil.rmtree(tree)
    for name in listed.stdout.decode().split("\0"):
        source = REPO_ROOT / name
        if name and source.is_file():
            target = tree / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def compile_modules(tree: Path) -> int:
    """Build the copy's extensions in place; how many there are."""
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        env={**os.environ, "KEYPROXY_COMPILE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CompileError(f"mypyc could not compile the modules: {tail[0]}")
    return sum(1 for _ in (tree / "keyproxy").rglob("*.so"))


def datapath_us(tree: Path, iterations: int) -> float:
    """`datapath.py --full` in `tree` (run there, so its own `keyproxy` is imported)."""
    done = subprocess.run(
        [sys.executable, "bench/datapath.py", "--full", "--iterations", str(iterations)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"([\d.]+) µs per request", done.stdout)
    if done.returncode != 0 or found is None:
        raise CompileError(f"datapath.py failed in {tree}: {done.stderr.strip()[-200:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_args: list[str] | None = None
    if "--" in argv:
        cut = argv.index("--")
        argv, run_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=BENCH_DIR / "out" / "compiled-tree")
    p.add_argument("--iterations", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two trees")
    args = p.parse_args(argv)
    tree = args.tree.resolve()
    try:
        copy_tree(tree)
        print(f"compiled {compile_modules(tree)} modules with mypyc in {tree}")
        python, compiled = [], []
        for _ in range(args.rounds):
            python.append(datapath_us(REPO_ROOT, args.iterations))
            compiled.append(datapath_us(tree, args.iterations))
        best_py, best_c = min(python), min(compiled)
        print(
            f"data path, full policy, CPU µs per request (best of {args.rounds}): "
            f"Python {best_py:.2f}, compiled {best_c:.2f} ({best_c / best_py:.2f}×)"
        )
    except CompileError as exc:
        print(f"compiled.py: {exc}", file=sys.stderr)
        return 1
    if run_args is not None:
        return subprocess.run(
            [sys.executable, "bench/run.py", *run_args], cwd=tree, check=False
        ).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
