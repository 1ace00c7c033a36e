"""The package's architecture rules that import-linter cannot see (its layers are checked by `lint-imports` in CI).

* no module imports another module's private (underscore) name;
* exactly one module, ``pyrefusal/runtime/capi.py``, touches llama.cpp's C API (``llama_cpp.llama_*``,
  ``llama_cpp.ggml_*`` and the C constants), so ABI changes of the pinned llama-cpp-python land in one file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyrefusal"
C_API_MODULE = PACKAGE / "runtime" / "capi.py"
C_API_PREFIXES = ("llama_", "ggml_", "LLAMA_", "GGML_")


def _where(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix() if path.is_relative_to(PACKAGE) else path.name


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pyrefusal":
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__") and alias.name != "_core"
                if private:
                    bad.append(f"{_where(path)}:{node.lineno} imports {node.module}.{alias.name}")
    return bad


def _private_attributes(path: Path) -> list[str]:
    """``module._name`` where ``module`` is a pyrefusal module imported by ``path`` (``from pyrefusal.x import y``
    or ``import pyrefusal.x as y``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pyrefusal":
            for alias in node.names:
                target = PACKAGE.parent.joinpath(*node.module.split("."), alias.name)
                if target.with_suffix(".py").exists() or (target / "__init__.py").exists():
                    modules.add(alias.asname or alias.name)
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name.startswith("pyrefusal.") and a.asname}
    return [
        f"{_where(path)}:{node.lineno} uses {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]


def _c_api_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    uses = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "llama_cpp"
            and node.attr.startswith(C_API_PREFIXES)
        ):
            uses.append(f"{_where(path)}:{node.lineno} llama_cpp.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama_cpp"):
            uses += [
                f"{_where(path)}:{node.lineno} from {node.module} import {a.name}"
                for a in node.names
                if a.name.startswith(C_API_PREFIXES) or node.module == "llama_cpp.llama_cpp"
            ]
    return uses


def test_no_module_imports_a_private_name() -> None:
    bad = [line for path in _modules() for line in (*_private_imports(path), *_private_attributes(path))]
    assert not bad, "make these names public (and documented) or move them:\n" + "\n".join(bad)


@pytest.mark.skipif(not C_API_MODULE.exists(), reason="runtime/capi.py not written yet")
def test_only_the_capi_module_calls_the_c_api() -> None:
    outside = [line for path in _modules() if path != C_API_MODULE for line in _c_api_uses(path)]
    assert not outside, "llama.cpp C API calls outside pyrefusal/runtime/capi.py:\n" + "\n".join(outside)
    assert _c_api_uses(C_API_MODULE), "capi.py should be where the C API is called"


def test_the_c_api_contract_covers_every_module() -> None:
    """import-linter's ctypes contract lists modules explicitly: a new module must not slip past it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["id"] == "c-api-in-one-module")
    covered = tuple(contract["source_modules"])
    names = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in _modules()]
    names = [n.removesuffix(".__init__") for n in names if n != "pyrefusal.__init__" and not n.endswith("capi")]
    missing = [n for n in names if not any(n == c or n.startswith(c + ".") for c in covered)]
    missing = [n for n in missing if n not in ("pyrefusal.runtime",)]  # the package itself: re-exports only
    assert not missing, f"add these to the c-api-in-one-module contract in pyproject.toml: {missing}"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The scanners are not vacuous: a private import and a C call in a module are reported."""
    fake = tmp_path / "x.py"
    fake.write_text("import llama_cpp\nfrom pyrefusal.rundir import _alive\nllama_cpp.llama_decode(None, None)\n")
    assert _private_imports(fake) == ["x.py:2 imports pyrefusal.rundir._alive"]
    assert _c_api_uses(fake) == ["x.py:3 llama_cpp.llama_decode"]
    fake.write_text("from pyrefusal.steering import export as ex\nex._private_helper()\nex.public()\n")
    assert _private_attributes(fake) == ["x.py:2 uses ex._private_helper"]


def test_the_public_api_resolves_lazily() -> None:
    """Every name of ``pyrefusal.__all__`` loads, and importing the package alone loads no llama.cpp."""
    import subprocess
    import sys

    code = (
        "import sys, pyrefusal as pr\n"
        "assert 'llama_cpp' not in sys.modules and 'numpy' not in sys.modules\n"
        "missing = [n for n in pr.__all__ if getattr(pr, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert pr.run.__name__ == 'run_pipeline' and pr.RunSettings.preset('paper').n_test == 572\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
