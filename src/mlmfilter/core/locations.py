"""Where a file is: a local path, or a URL on another filesystem (``s3://``, ``memory://``, ...).

mlmfilter writes local locations as plain absolute paths and every other one as a URL with its
protocol, so a location string alone tells which it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def is_local_filesystem(fs: Any) -> bool:
    """True for fsspec's local filesystem (``file``/``local``), whose paths are the OS's own."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def location_of(fs: Any, path: str) -> str:
    """``path`` on ``fs`` as mlmfilter records it: local files as absolute paths, others as URLs."""
    if is_local_filesystem(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def is_url(location: str) -> bool:
    """True for a URL with a protocol (``s3://b/x``), False for a path on this machine."""
    return "://" in location


def as_path(location: str) -> Path | str:
    """A local location as a :class:`~pathlib.Path`; a URL stays the string it is."""
    return location if is_url(location) else Path(location)


def local_path(location: str | os.PathLike, what: str, why: str = "") -> Path:
    """``location`` as a local Path, for what only a local folder or file can be; a URL (``s3://``)
    is refused with a ValueError naming ``what`` and ``why``, never taken for a folder named ``s3:``.
    ``file://`` URLs are local paths."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif is_url(text):
        raise ValueError(
            f"{what} must be on this machine, not {text}" + (f" ({why})" if why else "") + "; give a local path"
        )
    return Path(text).expanduser()
