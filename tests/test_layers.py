"""Lower layers know nothing above them (STYLE.md): models <- store and streams <- pipeline
and views <- app <- cli. Checked on the source, so a new import cannot slip in unseen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "taskd"

# Each module's layer; a module may import from its own layer and the ones below.
LAYERS: dict[str, int] = {
    # plain data, rules and settings
    "models": 0,
    "errors": 0,
    "config": 0,
    "background": 0,
    # typed keys, logging, request/response models
    "keys": 1,
    "logs": 1,
    "schemas": 1,
    "responses": 1,
    # storage: SQL, Redis
    "store": 2,
    "db": 2,
    "streams": 2,
    "shards": 2,
    # the pipeline and the request layer
    "auth": 3,
    "cutoffs": 3,
    "throttle": 3,
    "relay": 3,
    "hub": 3,
    "subscription": 3,
    "listener": 3,
    "feed": 3,
    "keepalive": 3,
    "metrics": 3,
    "forwarded": 3,
    "views": 4,
    "routes": 5,
    "openapi": 5,
    "app": 6,
    "server": 6,
    "cli": 7,
    "__main__": 8,
}


def _layer_of(dotted: str) -> tuple[str, int]:
    """`taskd.store.tasks` -> ("store", 2)."""
    top = dotted.split(".")[1] if dotted.count(".") else "__init__"
    assert top in LAYERS, f"taskd.{top} has no layer in this test: add it"
    return top, LAYERS[top]


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Every `taskd...` module imported outside `if TYPE_CHECKING:` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return  # annotations only: no import at run time
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("taskd"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found.extend(names if node.module == "taskd" else [node.module])
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("taskd"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("taskd", *path.relative_to(PACKAGE).with_suffix("").parts))
        if module == "taskd.__init__" or (module.endswith(".__init__") and module.count(".") == 1):
            continue
        name, layer = _layer_of(module)
        for imported in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            other, other_layer = _layer_of(imported)
            if other != name and other_layer > layer:
                upward.append(f"{module} ({layer}) imports {imported} ({other_layer})")
    assert upward == []


def test_every_module_reads_in_one_sitting() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}
