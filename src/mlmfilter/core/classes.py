"""A class named by its import path, ``"package.module:Class"``: how a worker process rebuilds a
stage or an executor it was only told the name of, with no registry to keep in step."""

from __future__ import annotations

import importlib
from typing import Any


def class_path(cls: type) -> str:
    """``"module:QualifiedName"`` of ``cls``, what :func:`import_class` turns back into it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str, base: type | None = None) -> Any:
    """The class ``path`` names (``"module:Class"``, nested classes as ``Outer.Inner``).

    Raises ValueError naming the path when it is malformed, names no module or class, or is not
    a subclass of ``base``. An ImportError inside the module (a missing optional extra) stays one.
    """
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"{path!r} is not a class path (expected 'package.module:Class')")
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise ValueError(f"cannot import {path!r}: no module {exc.name!r}") from None
        raise
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
    except AttributeError:
        raise ValueError(f"cannot import {path!r}: {module_name} has no {qualname!r}") from None
    if base is not None and not (isinstance(found, type) and issubclass(found, base)):
        raise ValueError(f"{path!r} is not a {base.__name__}")
    return found
