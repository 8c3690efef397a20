"""The one recipe per id: the values below were produced by the recipes as they stood before they
were gathered in core/ids.py (run folders, request caches and uids made then must still match)."""

from __future__ import annotations

import json

import pytest

from mlmfilter.clients.cache import request_key
from mlmfilter.core.ids import canonical_json, canonical_sha256, fingerprint_of, shard_id_for, shard_id_stem, uid_of
from mlmfilter.evaluation.scoring import pair_uid
from mlmfilter.io.sources import expand_inputs
from mlmfilter.io.uid import derive_uid
from mlmfilter.runs.folder import RunFolder
from mlmfilter.teach.pairs import negative_uid
from tests.support.builders import write_shard


def test_settings_fingerprints_keep_their_values():
    assert fingerprint_of({"kind": "x"}) == "e579f8356b455e01"
    assert fingerprint_of({"b": 1, "a": [1, 2.5, None, True]}) == "8e2ab7c9e0c74ca1"
    assert fingerprint_of({"kind": "énhance", "t": "日本"}) == "8402b8ec52f100c7"  # escaped, as ever
    assert fingerprint_of({"kind": "imported", "stage": "score"}) == "373b7f9ded1cd77a"
    assert fingerprint_of({"b": 2, "a": 1}) == fingerprint_of({"a": 1, "b": 2})  # key order is not a setting


def test_request_keys_keep_the_compact_unescaped_dialect():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 日本"}], "temperature": 0.5, "n": 2}
    text = canonical_json(body, ensure_ascii=False, compact=True)
    assert text == '{"messages":[{"content":"héllo 日本","role":"user"}],"model":"m","n":2,"temperature":0.5}'
    assert request_key(body) == "a78f4810436608d9e7b4c17ec447fb1fa2fce3552e5169918c7c1ed9226ca659"
    assert request_key(json.loads(json.dumps(body))) == request_key(body)
    assert canonical_sha256(body) != request_key(body)  # another dialect is another key


def test_every_uid_is_the_one_blake2b_recipe():
    assert derive_uid("a/b/00000012.tar", "k1") == "19c7c845d4e2e6007a2a969f57b5483c" == uid_of("00000012.tar/k1")
    assert derive_uid("s3://x/00000012.tar", "k1") == derive_uid("00000012.tar", "k1")  # where it lives is no part
    assert pair_uid("a", "b") == "852635742d6eb30fdccb0e7c1b53d92f" == uid_of("a\x00b")
    assert negative_uid("abc", "swap", 3) == "382a65beea878e35351b536fda5a7f49" == uid_of("abc/negative/swap/3")
    assert len(uid_of("")) == 32 and int(uid_of(""), 16) >= 0


def test_shard_ids_are_safe_stems_and_hashed_only_when_taken():
    assert shard_id_stem("x y") == "x_y" and shard_id_stem("..weird!!") == "weird" and shard_id_stem("é") == "shard"
    assert shard_id_for("00000", "/data/a/00000.tar") == "00000"
    assert shard_id_for("00000", "/data/a/00000.tar", {"00000"}) == "00000-b0ce419b"
    assert shard_id_for("00000", "s3://bucket/b/00000.tar", {"00000"}) == "00000-4f2aeef5"


def test_expanding_inputs_and_registering_them_name_shards_alike(tmp_path):
    """Colliding stems in two folders: both recipes' users give each shard the same id."""
    for folder in ("a", "b"):
        for name in ("00000.tar", "x y.tar", "solo-" + folder + ".tar"):
            write_shard(tmp_path / folder / name, [{"key": "k", "txt": "a caption"}])
    sources = expand_inputs([str(tmp_path / "*" / "*.tar")])
    ids = {s.url: s.id for s in sources}
    assert ids[str(tmp_path / "a" / "solo-a.tar")] == "solo-a"
    collided = [ids[str(tmp_path / f / "00000.tar")] for f in ("a", "b")]
    assert collided == [shard_id_for("00000", str(tmp_path / f / "00000.tar"), {"00000"}) for f in ("a", "b")]
    assert len(set(collided)) == 2 and all(i.startswith("00000-") for i in collided)

    folder = RunFolder(tmp_path / "run")
    first = folder.open([], [s for s in sources if "/a/" in s.url], {})  # a's shards first: no collision yet
    assert {s.id for s in first} == {"00000", "x_y", "solo-a"}
    registered = {s.url: s.id for s in folder.open([], sources, {})}
    assert registered[str(tmp_path / "b" / "00000.tar")] == ids[str(tmp_path / "b" / "00000.tar")]
    assert registered[str(tmp_path / "a" / "00000.tar")] == "00000"  # an id once given never changes


@pytest.mark.parametrize("value", [{"p": object()}, {"when": 1.5, "what": b"x"}])
def test_values_json_does_not_know_are_written_as_text(value):
    assert fingerprint_of(value) == fingerprint_of(json.loads(canonical_json(value)))
