"""What identifies a block's output for resume: settings, resolved model, library versions.

Derived from a block's provenance by dropping what does not change results (device, where a
cache lives, mlmfilter's own version) and replacing a local model directory by a hash of its
contents, so that the same model copied elsewhere is the same identity and a retrained model in
the same folder is not.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

#: keys that describe where or how fast, not what: never part of an identity (a resume may use
#: another device, or another replica of the same served model at another ``base_url``)
VOLATILE_KEYS = frozenset({"device", "cache_path", "mlmfilter", "python", "seconds", "requested_device", "base_url"})
#: files hashed whole up to this size; bigger ones by size + their first and last MiB (weights are
#: big, and a changed checkpoint changes its safetensors header at the head of the file)
FULL_HASH_LIMIT = 8 << 20
_EDGE = 1 << 20


def stable_identity(value: Any) -> Any:
    """``value`` (a provenance dict) without volatile keys, local model paths as content hashes."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in VOLATILE_KEYS:
                continue
            if key == "local_path" and isinstance(item, str) and os.path.isdir(item):
                out["content_hash"] = directory_hash(item)
                continue
            out[key] = stable_identity(item)
        return out
    if isinstance(value, (list, tuple)):
        return [stable_identity(v) for v in value]
    return value


def options_identity(options: dict[str, Any]) -> dict[str, Any]:
    """Options with a ``model`` that names a local directory replaced by that directory's hash."""
    out = dict(options)
    model = out.get("model")
    if isinstance(model, str) and os.path.isdir(os.path.expanduser(model)):
        out["model"] = f"local:{directory_hash(os.path.expanduser(model))}"
    return out


def directory_hash(path: str | os.PathLike) -> str:
    root = Path(path).expanduser().resolve()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0".encode())
        digest.update(_file_digest(str(file), stat.st_size, stat.st_mtime_ns))
    return digest.hexdigest()[:24]


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            digest.update(fh.read(_EDGE))
    return digest.digest()
