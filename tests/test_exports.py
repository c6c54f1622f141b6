"""The public faces: every module's ``__all__`` is sorted and honest."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import dynaconnd
import magenta_dynaconn


def _isort_key(name: str) -> tuple[int, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions.
    if name.isupper():
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def _modules() -> list[str]:
    names = []
    for package in (dynaconnd, magenta_dynaconn):
        names.append(package.__name__)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "__main__":
                names.append(f"{package.__name__}.{info.name}")
    return names


@pytest.mark.parametrize("module_name", _modules())
def test_all_is_sorted_and_every_name_exists(module_name: str) -> None:
    """Each module lists its public names sorted, and each one exists."""
    module = importlib.import_module(module_name)
    exported = list(getattr(module, "__all__", []))

    assert sorted(exported, key=_isort_key) == exported
    assert [] == [name for name in exported if not hasattr(module, name)]


def test_client_exports_the_registry_and_every_error() -> None:
    """Apps import the registry and all errors from the package itself."""
    expected = {
        "ConfigError",
        "ConfigIssue",
        "DatabaseRegistry",
        "DynaconnError",
        "MissingDriverError",
        "NoPrimaryKeyError",
        "ProtocolMismatchError",
        "RegistryUnavailableError",
        "UnknownDatabaseError",
        "UnknownTableError",
        "WritesDisabledError",
        "__version__",
    }

    assert expected == set(magenta_dynaconn.__all__)


def test_every_leaf_error_also_subclasses_a_builtin() -> None:
    """Leaves of the error tree also derive from the matching builtin."""
    leaves = [
        getattr(magenta_dynaconn, name)
        for name in magenta_dynaconn.__all__
        if name.endswith("Error") and name != "DynaconnError"
    ]

    assert [] == [
        leaf.__name__
        for leaf in leaves
        if not any(
            base.__module__ == "builtins" and base is not Exception
            for base in leaf.__mro__
        )
    ]
