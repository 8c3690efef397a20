from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from mlmfilter.io.uid import (
    HALVES_DTYPE,
    derive_uid,
    halves_to_uids,
    is_sorted_halves,
    isin_sorted,
    normalize_uid,
    sort_halves,
    uids_to_halves,
)


def random_uids(n: int, seed: int = 0) -> list[str]:
    text = np.random.default_rng(seed).bytes(16 * n).hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


def test_derive_uid_is_the_documented_blake2b_of_basename_and_key():
    expected = hashlib.blake2b(b"00000012.tar/000120034", digest_size=16).hexdigest()
    assert derive_uid("00000012.tar", "000120034") == expected
    # the directory or URL the shard was read from does not change the uid
    assert derive_uid("s3://bucket/shards/00000012.tar", "000120034") == expected
    assert derive_uid("/data/00000012.tar", "000120035") != expected
    assert len(expected) == 32 and normalize_uid(expected) == expected


def test_normalize_uid_accepts_datacomp_uids_and_rejects_the_rest():
    uid = "6a7be47fa8e3b4bbf41b3a52a0bb3ad4"
    assert normalize_uid(uid) == uid
    assert normalize_uid(" " + uid.upper() + "\n") == uid
    assert normalize_uid(uid.encode()) == uid
    assert normalize_uid(int(uid, 16)) == uid
    assert normalize_uid(1) == "0" * 31 + "1"
    for bad in (None, "", uid[:-1], uid + "0", "g" + uid[1:], 1 << 128, -1, True, 3.5, ["x"]):
        assert normalize_uid(bad) is None, bad


def test_halves_match_python_int_parsing_for_a_million_uids():
    uids = random_uids(1_000_000)
    halves = uids_to_halves(pa.array(uids, type=pa.string()))
    assert halves.dtype == HALVES_DTYPE and len(halves) == len(uids)
    expected_f0 = np.array([int(u[:16], 16) for u in uids], dtype=np.uint64)
    expected_f1 = np.array([int(u[16:], 16) for u in uids], dtype=np.uint64)
    np.testing.assert_array_equal(halves["f0"], expected_f0)
    np.testing.assert_array_equal(halves["f1"], expected_f1)
    assert halves_to_uids(halves) == uids


def test_halves_of_extreme_values_and_every_input_kind():
    uids = ["0" * 32, "f" * 32, "0" * 16 + "f" * 16, "8" + "0" * 31] + random_uids(50, seed=1)
    expected = uids_to_halves(uids)
    assert int(expected["f0"][1]) == 2**64 - 1 and int(expected["f1"][2]) == 2**64 - 1
    assert int(expected["f0"][3]) == 2**63 and int(expected["f1"][3]) == 0
    arrow = pa.array(uids)
    kinds = {
        "sliced arrow": (uids_to_halves(arrow.slice(3)), expected[3:]),
        "chunked": (uids_to_halves(pa.chunked_array([arrow[:5], arrow[5:]])), expected),
        "large_string": (uids_to_halves(arrow.cast(pa.large_string())), expected),
        "binary": (uids_to_halves(arrow.cast(pa.binary())), expected),
        "dictionary": (uids_to_halves(arrow.dictionary_encode()), expected),
        "numpy str": (uids_to_halves(np.array(uids)), expected),
        "numpy bytes": (uids_to_halves(np.array([u.encode() for u in uids])), expected),
        "upper case": (uids_to_halves([u.upper() for u in uids]), expected),
        "empty": (uids_to_halves([]), np.zeros(0, HALVES_DTYPE)),
    }
    for name, (got, want) in kinds.items():
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert halves_to_uids(expected) == uids


@pytest.mark.parametrize(
    "values, message",
    [
        (["a" * 32, "a" * 31], "row 1 is 31 bytes long"),
        (["a" * 32, "a" * 32, "z" * 32], "row 2 is not hex"),
        (["a" * 32, None], "row 1 is null"),
        ([("é" + "a" * 31)], "row 0"),
    ],
)
def test_invalid_uids_raise_naming_the_row(values, message):
    with pytest.raises(ValueError, match=message):
        uids_to_halves(pa.array(values, type=pa.string()))


def test_sorted_membership_agrees_with_a_python_set():
    keep_uids = random_uids(5000, seed=2)
    others = random_uids(5000, seed=3)
    keep = sort_halves(uids_to_halves(keep_uids))
    assert is_sorted_halves(keep) and not is_sorted_halves(uids_to_halves(keep_uids))
    assert sorted(halves_to_uids(keep)) == halves_to_uids(keep)  # hex order == numeric order
    query = keep_uids[::7] + others[::5]
    mask = isin_sorted(keep, uids_to_halves(query))
    assert mask.tolist() == [u in set(keep_uids) for u in query]
    assert mask.sum() == len(keep_uids[::7])
    assert isin_sorted(keep[:0], uids_to_halves(query)).sum() == 0


def test_block_boundaries_do_not_change_results_or_error_rows(monkeypatch):
    import mlmfilter.io.uid as uid_module

    uids = random_uids(100, seed=4)
    expected = uids_to_halves(uids)
    monkeypatch.setattr(uid_module, "_CHUNK_ROWS", 7)
    arrow = pa.array(uids)
    np.testing.assert_array_equal(uids_to_halves(pa.chunked_array([arrow[:30], arrow[30:]])), expected)
    np.testing.assert_array_equal(uids_to_halves(np.array(uids)), expected)
    assert halves_to_uids(expected) == uids
    with pytest.raises(ValueError, match="row 52 is not hex"):
        uids_to_halves(uids[:52] + ["x" * 32] + uids[53:])
