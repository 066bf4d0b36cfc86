"""The layering rules of DESIGN.md and STYLE.md, checked on the source.

(a) Cores are pure: a core module never imports ``asyncio``, ``socket``, ``time``,
    ``random`` or ``aiohttp``. ``random`` is tolerated only under ``if TYPE_CHECKING:``
    (a core may *annotate* its ``rng: random.Random`` parameter, never make one).
    Adapters are files named ``transport.py``, ``server.py``, ``sim.py`` or
    ``testing.py``, and everything under ``meshnode/``.
(b) ``gossip``, ``ca`` and ``proxy`` never import ``meshnode`` or each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("gossip", "ca", "proxy")
PACKAGES = (*LIBRARIES, "meshnode")
ADAPTER_FILES = frozenset({"transport.py", "server.py", "sim.py", "testing.py"})
FORBIDDEN_IN_CORES = frozenset({"asyncio", "socket", "time", "random", "aiohttp"})
TYPE_ONLY_ALLOWED = frozenset({"random"})


@dataclass(frozen=True)
class Import:
    module: str  # the dotted module imported ("" for a relative "from . import x")
    line: int
    type_checking_only: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, package: str, under_type_checking: bool = False) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _imports_of(statement, package, True)
                yield from _imports(statement, package, True)
            for statement in child.orelse:
                yield from _imports_of(statement, package, under_type_checking)
                yield from _imports(statement, package, under_type_checking)
            continue
        yield from _imports_of(child, package, under_type_checking)
        yield from _imports(child, package, under_type_checking)


def _imports_of(node: ast.AST, package: str, type_only: bool) -> Iterator[Import]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield Import(alias.name, node.lineno, type_only)
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the package it lives in
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        yield Import(module, node.lineno, type_only)


def imports_in(path: Path, root: Path = ROOT) -> list[Import]:
    package = ".".join(path.relative_to(root).parts[:-1])
    tree = ast.parse(path.read_text(), filename=str(path))
    # Dynamic imports are imports too.
    found = list(_imports(tree, package))
    for call in ast.walk(tree):
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute | ast.Name)
            and getattr(call.func, "attr", getattr(call.func, "id", "")) == "import_module"
            and call.args
            and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str)
        ):
            found.append(Import(call.args[0].value, call.lineno, False))
    return found


def modules() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        if (ROOT / package).is_dir()
        for path in (ROOT / package).rglob("*.py")
        if ".venv" not in path.parts
    )


def is_adapter(path: Path, root: Path = ROOT) -> bool:
    relative = path.relative_to(root)
    return relative.parts[0] == "meshnode" or relative.name in ADAPTER_FILES


def core_violations(path: Path, root: Path = ROOT) -> list[str]:
    if is_adapter(path, root):
        return []
    problems = []
    for item in imports_in(path, root):
        top = item.module.split(".")[0]
        if top not in FORBIDDEN_IN_CORES:
            continue
        if item.type_checking_only and top in TYPE_ONLY_ALLOWED:
            continue
        where = " (move it under `if TYPE_CHECKING:`)" if top in TYPE_ONLY_ALLOWED else ""
        problems.append(
            f"{path.relative_to(root)}:{item.line}: core module imports {item.module!r}{where}"
        )
    return problems


def package_violations(path: Path, root: Path = ROOT) -> list[str]:
    own = path.relative_to(root).parts[0]
    if own not in LIBRARIES:
        return []
    problems = []
    for item in imports_in(path, root):
        top = item.module.split(".")[0]
        if top != own and top in PACKAGES:
            problems.append(
                f"{path.relative_to(root)}:{item.line}: {own} imports {item.module!r}"
                " (gossip, ca and proxy never import meshnode or each other)"
            )
    return problems


def test_there_are_modules_to_check() -> None:
    names = {str(p.relative_to(ROOT)) for p in modules()}
    assert "gossip/swim.py" in names
    assert "gossip/codec.py" in names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_cores_are_pure(path: Path) -> None:
    problems = core_violations(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_libraries_do_not_import_each_other(path: Path) -> None:
    problems = package_violations(path)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- the checker


def _check_source(tmp_path: Path, relative: str, source: str) -> list[str]:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return core_violations(path, tmp_path) + package_violations(path, tmp_path)


@pytest.mark.parametrize(
    ("relative", "source", "complaint"),
    [
        ("gossip/x.py", "import asyncio\n", "'asyncio'"),
        ("gossip/x.py", "from socket import socket\n", "'socket'"),
        ("ca/x.py", "def f():\n    import time\n", "'time'"),
        ("proxy/x.py", "import aiohttp.web\n", "'aiohttp.web'"),
        ("gossip/x.py", "import random\n", "TYPE_CHECKING"),
        (
            "gossip/x.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import time\n",
            "'time'",
        ),
        ("gossip/x.py", "from meshnode import config\n", "'meshnode'"),
        ("ca/x.py", "import gossip.codec\n", "'gossip.codec'"),
        ("proxy/sub/x.py", "from ca.issuer import Issuer\n", "'ca.issuer'"),
        ("gossip/x.py", "import importlib\nimportlib.import_module('asyncio')\n", "'asyncio'"),
    ],
)
def test_checker_catches(tmp_path: Path, relative: str, source: str, complaint: str) -> None:
    problems = _check_source(tmp_path, relative, source)
    assert problems and complaint in problems[0], problems
    assert relative in problems[0]


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("gossip/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import random\n"),
        ("gossip/transport.py", "import asyncio, socket, time, random\n"),
        ("gossip/sim.py", "import random, time\n"),
        ("ca/server.py", "import aiohttp\n"),
        ("meshnode/agent.py", "import asyncio\nimport gossip, ca, proxy\n"),
        ("gossip/x.py", "from . import codec\nfrom gossip.errors import GossipError\n"),
    ],
)
def test_checker_allows(tmp_path: Path, relative: str, source: str) -> None:
    assert _check_source(tmp_path, relative, source) == []
