"""The documented refusals match the code: README's error table and docs/decision.md.

Codes are read from the source (every `Deny(<status>, "<CODE>", ...)` under keyproxy/),
so a new refusal without a README row, a row for a refusal that no longer exists, or a
step whose refusals changed without docs/decision.md fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from keyproxy.checks import build_checks
from keyproxy.config.model import RateLimitSettings
from keyproxy.ratelimit import open_limiter

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keyproxy"

#: Refusals defined in the code that clients cannot receive yet, so the README does not list
#: them; each must still exist in the code and must not be in the table (then drop it here).
NOT_SENT_YET = {}


def _denials(node: ast.AST) -> set[tuple[int, str]]:
    """(status, code) of every `Deny(...)` call with literal status and code under `node`."""
    found = set()
    for call in ast.walk(node):
        if not isinstance(call, ast.Call) or len(call.args) < 2:
            continue
        func = call.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        status, code = call.args[0], call.args[1]
        if (
            name == "Deny"
            and isinstance(status, ast.Constant)
            and isinstance(status.value, int)
            and isinstance(code, ast.Constant)
            and isinstance(code.value, str)
        ):
            found.add((status.value, code.value))
    return found


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def code_denials() -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    for path in PACKAGE.rglob("*.py"):
        found |= _denials(_tree(path))
    return found


def reachable_denials(path: Path, name: str) -> set[tuple[int, str]]:
    """The refusals of top-level `name` in `path` and of every top-level function,
    class or constant of the same module it refers to, transitively."""
    tree = _tree(path)
    top: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            top[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    top[target.id] = node
    seen: set[str] = set()
    todo = [name]
    found: set[tuple[int, str]] = set()
    while todo:
        current = todo.pop()
        if current in seen or current not in top:
            continue
        seen.add(current)
        found |= _denials(top[current])
        todo += [n.id for n in ast.walk(top[current]) if isinstance(n, ast.Name)]
    assert name in seen, f"{name} is not defined at the top of {path}"
    return found


def readme_table() -> set[tuple[int, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    return {
        (int(status), code)
        for status, code in re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", section, re.M)
    }


def test_every_refusal_in_the_code_has_a_readme_row():
    missing = code_denials() - readme_table() - NOT_SENT_YET.keys()
    assert not missing, f"add these to README.md's error table: {sorted(missing)}"


def test_every_readme_row_is_a_refusal_in_the_code():
    stale = readme_table() - code_denials()
    assert not stale, f"README.md's error table lists codes the code never uses: {sorted(stale)}"


def test_the_not_sent_yet_list_is_current():
    in_code, in_table = code_denials(), readme_table()
    for denial, why in NOT_SENT_YET.items():
        assert denial in in_code, f"{denial} ({why}) is gone from the code: drop it here"
        assert denial not in in_table, f"{denial} is documented now: drop it from NOT_SENT_YET"


def decision_rows() -> list[tuple[str, list[str], set[tuple[int, str]]]]:
    """(step and check name, backticked locations, refusals) of docs/decision.md's table."""
    text = (ROOT / "docs" / "decision.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        step, check, where, refusals = cells
        locations = re.findall(r"`([^`]+)`", where)
        codes = {(int(s), c) for s, c in re.findall(r"`(\d{3}) ([A-Z_]+)`", refusals)}
        rows.append((f"{step} {check}", locations, codes))
    return rows


def test_decision_doc_lists_every_check_in_order_with_its_refusals():
    checks = build_checks(open_limiter(RateLimitSettings()))
    rows = decision_rows()
    assert [name for name, _, _ in rows] == [check.name for check in checks]
    for check, (name, locations, documented) in zip(checks, rows, strict=True):
        run = check.run
        defined = run if callable(run) and hasattr(run, "__qualname__") else type(run)
        module, qualname = defined.__module__, defined.__qualname__
        assert locations[:2] == [module.replace(".", "/") + ".py", qualname], name
        found = reachable_denials(ROOT / locations[0], qualname)
        for helper in locations[2:]:  # modules the check calls into: all of their refusals
            found |= _denials(_tree(ROOT / helper))
        assert documented == found, f"docs/decision.md, step {name}: the code refuses {found}"
