"""Domain modules are pure (STYLE.md, layout): they import neither nameko nor
SQLAlchemy, nor the broker, green-thread, database or web libraries, not even
through another ``services`` module.

Two checks: the import graph read from the source (every ``services.*``
import followed, packages' ``__init__`` included), which names the chain that
reaches a forbidden library; and the domain modules imported in a fresh
interpreter, whose ``sys.modules`` must hold none of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("nameko", "sqlalchemy", "kombu", "eventlet", "psycopg", "flask")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def domain_modules() -> list[str]:
    """Every ``services/*/domain.py``, every module of a ``services/*/domain/``
    package, and the shared pure modules."""
    services = ROOT / "services"
    paths = [
        *services.glob("*/domain.py"),
        *services.glob("*/domain/**/*.py"),
        services / "common" / "terms.py",
        services / "common" / "units.py",
    ]
    return sorted({_module_name(path) for path in paths})


def _source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> list[str]:
    """What ``module`` imports, as absolute names, with the packages whose
    ``__init__`` runs first; a ``from a import b`` names ``a.b`` when that is a
    module of ours."""
    path = _source(module)
    if path is None:
        return []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.append(source)
            names += [
                f"{source}.{alias.name}"
                for alias in node.names
                if _source(f"{source}.{alias.name}") is not None
            ]
    found = []
    for name in names:
        parts = name.split(".")
        found += [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return list(dict.fromkeys(found))


def forbidden_chain(module: str) -> list[str] | None:
    """The first import chain from ``module`` to a forbidden library, or None."""
    seen = {module}
    paths = [[module]]
    while paths:
        chain = paths.pop(0)
        for name in _imports(chain[-1]):
            if name.split(".")[0] in FORBIDDEN:
                return [*chain, name]
            if name.split(".")[0] == "services" and name not in seen:
                seen.add(name)
                paths.append([*chain, name])
    return None


def test_the_domain_modules_are_found():
    modules = domain_modules()
    assert "services.common.terms" in modules
    assert "services.vouchers.domain" in modules
    assert "services.city_registry.domain.recommendations" in modules


@pytest.mark.parametrize("module", domain_modules())
def test_a_domain_module_imports_no_framework(module):
    chain = forbidden_chain(module)
    assert chain is None, " -> ".join(chain)


def test_importing_the_domain_loads_no_framework():
    modules = domain_modules()
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert [name for name in loaded if name.split(".")[0] in FORBIDDEN] == []


def test_the_chain_to_a_framework_is_named():
    # The check itself: a service module does reach nameko, and says how.
    chain = forbidden_chain("services.city_registry.service")
    assert chain is not None and chain[0] == "services.city_registry.service"
    assert chain[-1].split(".")[0] in FORBIDDEN
