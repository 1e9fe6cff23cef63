"""The package's layers (docs/architecture.md): no import cycle between moecl's packages and top-level modules,
counting every import (also those inside functions), and the library never imports the application above it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lower layers must not import these (moecl.<name> packages or modules)
FORBIDDEN = {
    "model": {"train", "evaluation", "runstate", "demo", "pretrain", "ddas", "data"},
    "ddas": {"train", "evaluation", "runstate", "demo", "pretrain", "model"},
    "data": {"train", "evaluation", "runstate", "demo", "pretrain", "model", "ddas"},
    "runstate": {"train", "evaluation", "demo", "pretrain"},
    "evaluation": {"train", "demo", "pretrain"},
    "methods": {"config", "model", "train", "evaluation"},
}


def package_graph() -> dict[str, set[str]]:
    """moecl.<top> -> the moecl.<top> names it imports (its own name excluded)."""
    edges: dict[str, set[str]] = {}
    for f in (ROOT / "moecl").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mod = parts[:-1] if is_pkg else parts
        here = mod[1] if len(mod) > 1 else "__init__"
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = list(mod if is_pkg else mod[:-1])[: len(mod if is_pkg else mod[:-1]) - (node.level - 1)]
                targets = (([".".join(base + [node.module])]) if node.module
                           else [".".join(base + [a.name]) for a in node.names])
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            for t in targets:
                p = t.split(".")
                if p[0] == "moecl" and len(p) > 1 and p[1] != here:
                    edges.setdefault(here, set()).add(p[1])
    return edges


def test_no_import_cycle_between_packages():
    edges = package_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_lower_layers_do_not_import_higher_ones():
    edges = package_graph()
    bad = {pkg: sorted(edges.get(pkg, set()) & banned) for pkg, banned in FORBIDDEN.items()}
    assert not any(bad.values()), bad
