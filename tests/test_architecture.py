"""The house's dependency rules, read from the imports of every module.

apps -> strategies -> pruning; apps -> fedprune (the task package, with the wire protocol
fedprune/protocol.py as the leaf both apps share); the ClientApp never imports strategies/ and the
strategies never import client_app/; pruning/ imports neither Flower nor the rest of the house;
nothing imports an app (the registry names app modules as strings); no private name is imported
across modules.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pruning", "fedprune", "strategies", "client_app", "server_app", "deploy", "benchmarks")
FORBIDDEN = {
    "pruning": ("flwr", "fedprune", "strategies", "client_app", "server_app", "deploy", "benchmarks"),
    "fedprune": ("strategies", "client_app", "server_app", "benchmarks"),
    "strategies": ("client_app", "server_app", "deploy", "benchmarks"),
    "client_app": ("strategies", "server_app", "deploy", "benchmarks"),
    "server_app": ("client_app", "deploy", "benchmarks"),
    "deploy": ("strategies", "client_app", "server_app", "benchmarks"),
}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    broken = [f"{path.relative_to(ROOT)} imports {module}" for path in modules(package)
              for module, _ in imports(path) if module.split(".")[0] in FORBIDDEN[package]]
    assert not broken, broken


def test_no_private_name_is_imported_across_modules():
    own = {p.split(".")[0] for p in PACKAGES} | {"tests"}
    broken = [f"{path.relative_to(ROOT)}: {name} from {module}"
              for package in (*PACKAGES, "tests") for path in modules(package)
              for module, names in imports(path) if module.split(".")[0] in own
              for name in names if name.startswith("_") and not name.startswith("__")]
    assert not broken, broken
