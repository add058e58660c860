"""Imports run one way: a lower layer never imports a higher one.

    core (request.py) ← config ← policy ← checks ← app → forward → wire

`response/` (what goes back to the client), `services` (long-lived state) and the
small helpers beside them sit at the sides: everything may use them, they use only
the core layers. Read from the source with `ast`, so a violation fails here before
it becomes an import cycle. Imports under `if TYPE_CHECKING:` are only for the type
checker and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import keyproxy

ROOT = Path(keyproxy.__file__).parent

#: Layer of each module prefix; the longest matching prefix wins.
LAYERS = {
    "keyproxy.request": "core",
    "keyproxy.observability": "core",
    "keyproxy.config": "config",
    "keyproxy.policy": "policy",
    "keyproxy.ratelimit": "policy",
    "keyproxy.jwks": "policy",
    "keyproxy.checks": "checks",
    "keyproxy.response": "response",
    "keyproxy.observe": "services",
    "keyproxy.services": "services",
    "keyproxy.wire": "wire",
    "keyproxy.forward": "forward",
    "keyproxy.app": "app",
    "keyproxy.lifecycle": "app",
    "keyproxy.admin": "app",
    "keyproxy.workers": "app",
    "keyproxy.commands": "commands",
    "keyproxy.__main__": "commands",
    "keyproxy": "core",
}
#: What each layer may import (besides itself).
ALLOWED = {
    "core": set(),
    # The loader compiles the response sections (CORS, fields) once per snapshot.
    "config": {"core", "policy", "response"},
    "policy": {"core", "config"},
    "checks": {"core", "config", "policy", "response"},
    "response": {"core", "config", "policy"},
    "services": {"core", "config", "policy", "checks"},
    "wire": {"core", "config", "policy", "response"},
    "forward": {"core", "config", "policy", "response", "wire"},
    "app": {"core", "config", "policy", "checks", "response", "services", "wire", "forward"},
    "commands": {
        *("core", "config", "policy", "checks", "response", "services"),
        *("wire", "forward", "app"),
    },
}


def layer_of(module: str) -> str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, module) of every keyproxy import that runs, wherever it sits."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("keyproxy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("keyproxy"):
                found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        own = layer_of(module)
        for line, imported in runtime_imports(ast.parse(path.read_text()), package):
            theirs = layer_of(imported)
            if theirs != own and theirs not in ALLOWED[own]:
                out.append(f"{module}:{line} ({own}) imports {imported} ({theirs})")
    return out


def test_no_lower_layer_imports_a_higher_one() -> None:
    assert violations() == []


def test_the_rule_catches_an_upward_import() -> None:
    tree = ast.parse("from keyproxy.app import ProxyServer\n")
    ((_, imported),) = runtime_imports(tree, "keyproxy.wire")
    assert layer_of(imported) not in ALLOWED[layer_of("keyproxy.wire.exchange")]
    typed = ast.parse("if TYPE_CHECKING:\n    import keyproxy.app\n")
    assert runtime_imports(typed, "keyproxy.wire") == []
