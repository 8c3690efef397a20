"""The one recipe for each kind of id mlmfilter derives: shard ids, settings fingerprints, uids.

Every value here is written into run folders, request caches and score tables, so a recipe never
changes: the same input gives the same bytes in every version (a run folder made earlier resumes,
a cached request is found again, a uid joins the tables it joined before).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Container

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


# -- shard ids ------------------------------------------------------------------------------------
def shard_id_stem(name: str) -> str:
    """``name`` (a shard's file stem) made filename-safe: other characters become ``_``."""
    return _UNSAFE_ID_CHARS.sub("_", name).strip("._") or "shard"


def shard_id_for(name: str, url: str, taken: Container[str] = ()) -> str:
    """The id of the shard at ``url`` whose file stem is ``name``: the safe stem, or, when that
    stem is ``taken``, the stem plus a short hash of the url (``00000-7ceca398``)."""
    stem = shard_id_stem(name)
    if stem not in taken:
        return stem
    return f"{stem}-{hashlib.blake2b(url.encode(), digest_size=4).hexdigest()}"


# -- fingerprints of settings and requests --------------------------------------------------------
def canonical_json(value: Any, *, ensure_ascii: bool = True, compact: bool = False) -> str:
    """``value`` as JSON with sorted keys, so equal settings are equal text.

    ``ensure_ascii`` and ``compact`` (no spaces after separators) select the dialect a record was
    first written in; a caller keeps its dialect for ever. Values JSON does not know become ``str``.
    """
    separators = (",", ":") if compact else None
    return json.dumps(value, sort_keys=True, ensure_ascii=ensure_ascii, separators=separators, default=str)


def canonical_sha256(value: Any, *, ensure_ascii: bool = True, compact: bool = False) -> str:
    """The sha256 (64 hex characters) of :func:`canonical_json`: request cache keys, prompt hashes."""
    text = canonical_json(value, ensure_ascii=ensure_ascii, compact=compact)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_of(value: Any) -> str:
    """16 hex characters naming a set of settings: a stage's identity, a training's options.

    A resume compares them: equal settings, equal fingerprint, in every version.
    """
    return canonical_sha256(value)[:16]


# -- uids -----------------------------------------------------------------------------------------
def uid_of(text: str) -> str:
    """A 128-bit uid (32 lowercase hex characters, DataComp's shape) derived from ``text``.

    Each kind of pair names its own text (``"<shard file>/<key>"`` for a shard's pair, see
    :func:`mlmfilter.io.uid.derive_uid`); the hash is this one.
    """
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
