"""The pass registry: pass classes by kebab-case name, built-in and third-party.

Third-party passes arrive three ways, none of which needs editing qcompiler: the ``@register_pass``
decorator in a module the user imports (or names with ``qc --plugin FILE``), or an entry point in
the ``qcompiler.passes`` group of an installed distribution.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

from qcompiler.errors import QCError
from qcompiler.pass_manager import Pass

ENTRY_POINT_GROUP = "qcompiler.passes"
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

_registry: dict[str, type[Pass]] = {}
_loaded_builtins = False
_loaded_entry_points = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a `Pass` subclass available by its ``name`` in pipelines."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register_pass expects a Pass subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TypeError(f"pass {cls.__qualname__} needs a kebab-case `name`, got {name!r}")
    existing = _registry.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"pass name '{name}' is taken by {existing.__module__}.{existing.__qualname__}")
    _registry[name] = cls
    return cls


def _load_builtins() -> None:
    """The built-in passes, then the installed distributions' (each scanned once a process)."""
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        import qcompiler.passes as builtin

        for info in pkgutil.iter_modules(builtin.__path__):
            importlib.import_module(f"{builtin.__name__}.{info.name}")
    _load_entry_points()


def _load_entry_points() -> None:
    """The passes of the ``qcompiler.passes`` entry points of installed distributions."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as exc:
            raise QCError(f"cannot load pass plugin '{entry.name}' ({entry.value}): {exc}") from None
        if isinstance(loaded, type) and issubclass(loaded, Pass):
            register_pass(loaded)


def load_plugin_file(path: str | Path) -> None:
    """Import a Python file so the passes it registers become available."""
    path = Path(path)
    if not path.is_file():
        raise QCError("no such plugin file", file=str(path))
    module_name = f"qcompiler_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise QCError("not a Python file", file=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except QCError:
        raise
    except Exception as exc:
        raise QCError(f"plugin failed to import: {type(exc).__name__}: {exc}", file=str(path)) from None


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``; a `QCError` listing known passes otherwise."""
    _load_builtins()
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise QCError(f"unknown pass (known passes: {known})", pass_name=name) from None


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    _load_builtins()
    return dict(sorted(_registry.items()))
