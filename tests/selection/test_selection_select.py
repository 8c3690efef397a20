"""select_run over real parquet score files: top fractions, expressions, DataComp subset files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlmfilter.runs.runner import write_tables
from mlmfilter.selection import ExpressionError, SelectionError, select_run
from mlmfilter.selection.subset import read_datacomp_subset, write_datacomp_subset

SHARDS, ROWS_PER_SHARD = 5, 200


def datacomp_subset(uids: list[str]) -> np.ndarray:
    """How DataComp's baselines build a subset file from uid strings."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort()
    return arr


def write_run(root: Path, seed: int = 0) -> list[dict]:
    """A run folder with several shards: tied scores, errored rows with null scores, a NaN."""
    rng = np.random.default_rng(seed)
    rows = []
    tables = {}
    for shard in range(SHARDS):
        shard_rows = []
        for i in range(ROWS_PER_SHARD):
            error = rng.choice([None, "undecodable_image", "missing_caption"], p=[0.9, 0.07, 0.03])
            uid = "".join(rng.choice(list("0123456789abcdef"), 32))
            scored = error is None
            shard_rows.append(
                {
                    "uid": uid,
                    "shard": f"{shard:08d}",
                    "key": f"{shard:04d}{i:04d}",
                    "clip_score": float(np.round(rng.random() * 0.4, 2)) if scored else None,  # 41 values: ties
                    "rules_words": int(rng.integers(0, 30)) if scored else None,
                    "rules_ok": bool(rng.random() < 0.7) if scored else None,
                    "error": error,
                    "error_detail": f"detail of {error}" if error else None,
                }
            )
        if shard == 1:
            shard_rows[0]["clip_score"] = float("nan")
        table = pa.Table.from_pylist(
            shard_rows,
            schema=pa.schema(
                [
                    ("uid", pa.string()),
                    ("shard", pa.string()),
                    ("key", pa.string()),
                    ("clip_score", pa.float32()),
                    ("rules_words", pa.int64()),
                    ("rules_ok", pa.bool_()),
                    ("error", pa.string()),
                    ("error_detail", pa.string()),
                ]
            ),
        )
        tables[f"{shard:08d}"] = table
        rows += table.to_pylist()  # float32 values as stored
    write_tables(root, "score", tables)
    return rows


def expected_top(rows: list[dict], k: int, by: str, keep=lambda r: True, ascending=False) -> list[str]:
    """Brute force: qualifying rows sorted by score (best first), then by uid as an integer."""
    qualifying = [r for r in rows if keep(r) and r[by] is not None and r[by] == r[by]]
    qualifying.sort(key=lambda r: ((r[by] if ascending else -r[by]), int(r["uid"], 16)))
    return [r["uid"] for r in qualifying[:k]]


def kept_uids(output: Path) -> list[str]:
    return pq.read_table(output / "kept.parquet")["uid"].to_pylist()


@pytest.fixture()
def run(tmp_path) -> tuple[Path, list[dict]]:
    return tmp_path / "run", write_run(tmp_path / "run")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.77, 1.0])
def test_top_fraction_is_exact_and_matches_a_full_sort(run, tmp_path, fraction):
    run_dir, rows = run
    k = round(fraction * len(rows))
    qualifying = [r for r in rows if r["clip_score"] is not None and r["clip_score"] == r["clip_score"]]
    result = select_run(
        run_dir, tmp_path / "sel", top_fraction=fraction, by="clip_score", candidate_cap=25, batch_rows=100
    )
    expected = expected_top(rows, k, "clip_score")
    assert result.kept == len(expected) == min(k, len(qualifying))
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    np.testing.assert_array_equal(np.load(tmp_path / "sel" / "uids.npy"), datacomp_subset(expected))
    if k < len(qualifying):
        # the cut falls inside a group of tied scores: split by uid, reported in the threshold
        boundary = [r for r in rows if r["uid"] == expected[-1]][0]
        assert result.threshold["uid"] == expected[-1]
        assert result.threshold["score"] == pytest.approx(boundary["clip_score"], abs=1e-7)
        tied = [r for r in qualifying if r["clip_score"] == boundary["clip_score"]]
        assert result.threshold["tied_rows"] == len(tied)
        assert result.threshold["tied_kept"] == len([u for u in expected if u in {r["uid"] for r in tied}])
        assert 0 < result.threshold["tied_kept"] < result.threshold["tied_rows"]
        assert result.notes == []
    else:
        assert "fewer than the target" in result.notes[0]


def test_expression_then_fraction_of_the_whole_pool(run, tmp_path):
    run_dir, rows = run
    result = select_run(
        run_dir,
        tmp_path / "sel",
        expression="rules_ok and rules_words >= 5",
        top_fraction=0.2,
        by="clip_score",
        candidate_cap=10,
        batch_rows=77,
    )
    k = round(0.2 * len(rows))  # of all rows read, errored ones included
    expected = expected_top(rows, k, "clip_score", keep=lambda r: r["rules_ok"] and r["rules_words"] >= 5)
    assert result.target == k and result.kept == k
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    assert result.passed == len([r for r in rows if r["rules_ok"] and r["rules_words"] >= 5])
    kept = pq.read_table(tmp_path / "sel" / "kept.parquet")
    assert kept.column_names == ["uid", "shard", "key", "clip_score", "rules_ok", "rules_words"]
    assert all(kept["rules_ok"].to_pylist()) and min(kept["rules_words"].to_pylist()) >= 5


def test_ascending_keeps_the_lowest(run, tmp_path):
    run_dir, rows = run
    select_run(run_dir, tmp_path / "sel", top_fraction=0.1, by="rules_words", ascending=True, candidate_cap=5)
    expected = expected_top(rows, round(0.1 * len(rows)), "rules_words", ascending=True)
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)


def test_fewer_qualifying_than_k_keeps_all_and_says_so(run, tmp_path):
    run_dir, rows = run
    result = select_run(run_dir, tmp_path / "sel", expression="clip_score >= 0.39", top_fraction=0.5, by="clip_score")
    expected = [r["uid"] for r in rows if r["clip_score"] is not None and r["clip_score"] >= np.float32(0.39)]
    assert 0 < result.kept == len(expected) < result.target
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    assert any("fewer than the target" in note for note in result.notes)
    assert result.threshold is None


def test_expression_only_counts_and_summary_file(run, tmp_path):
    run_dir, rows = run
    result = select_run(run_dir, tmp_path / "sel", expression="not rules_ok")
    expected = [r["uid"] for r in rows if r["rules_ok"] is False]  # errored rows (null) never pass
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    errors = Counter(r["error"] for r in rows if r["error"])
    assert result.errors == errors and result.read == len(rows)
    assert result.scored == len(rows) - sum(errors.values())
    summary = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert summary["run_dir"] == str(run_dir)
    assert summary["arguments"]["expression"] == "not rules_ok"
    assert summary["counts"]["kept"] == len(expected) and summary["errors"] == dict(errors)
    assert summary["passes"] == 1
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["kept.parquet", "selection.json", "uids.npy"]


def test_uid_halves_columns_give_the_same_selection(run, tmp_path):
    """Large tables may store uids as two uint64 columns; the selection must not change."""
    run_dir, rows = run
    halves_run = tmp_path / "halves_run"
    tables = {}
    for path in sorted((run_dir / "score" / "tables").glob("*.parquet")):
        table = pq.read_table(path)
        uids = table["uid"].to_pylist()
        table = table.drop_columns(["uid"])
        table = table.append_column("uid_f0", pa.array([int(u[:16], 16) for u in uids], pa.uint64()))
        table = table.append_column("uid_f1", pa.array([int(u[16:], 16) for u in uids], pa.uint64()))
        tables[path.stem] = table
    write_tables(halves_run, "score", tables)
    select_run(run_dir, tmp_path / "a", top_fraction=0.4, by="clip_score", candidate_cap=20)
    select_run(halves_run, tmp_path / "b", top_fraction=0.4, by="clip_score", candidate_cap=20)
    a, b = np.load(tmp_path / "a" / "uids.npy"), np.load(tmp_path / "b" / "uids.npy")
    assert len(a) == round(0.4 * len(rows))
    np.testing.assert_array_equal(a, b)


def test_clear_errors(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(SelectionError, match="not a run folder"):
        select_run(tmp_path / "empty", tmp_path / "sel", top_fraction=0.5, by="clip_score")
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(SelectionError, match=r"top_fraction must be in \(0, 1\]"):
            select_run(run_dir, tmp_path / "sel", top_fraction=bad, by="clip_score")
    with pytest.raises(SelectionError, match="unknown column 'clip'.*clip_score"):
        select_run(run_dir, tmp_path / "sel", top_fraction=0.5, by="clip")
    with pytest.raises(SelectionError, match="cannot rank by 'shard'"):
        select_run(run_dir, tmp_path / "sel", top_fraction=0.5, by="shard")
    with pytest.raises(SelectionError, match="needs `by`"):
        select_run(run_dir, tmp_path / "sel", top_fraction=0.5)
    with pytest.raises(SelectionError, match="nothing to select by"):
        select_run(run_dir, tmp_path / "sel")
    with pytest.raises(ExpressionError, match="Did you mean 'rules_ok'"):
        select_run(run_dir, tmp_path / "sel", expression="rules_okk")
    assert not (tmp_path / "sel").exists() or not any((tmp_path / "sel").iterdir())  # nothing half-written


def test_subset_file_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(4)
    halves = np.zeros(1_000, dtype=np.dtype("u8,u8"))
    halves["f0"] = rng.integers(0, 5, 1_000)  # many equal f0: the order must fall back to f1
    halves["f1"] = rng.integers(0, 2**64, 1_000, dtype=np.uint64)
    doubled = np.concatenate([halves, halves[::3]])
    rng.shuffle(doubled)
    assert write_datacomp_subset(doubled, tmp_path / "subset.npy") == 1_000
    loaded = np.load(tmp_path / "subset.npy")
    assert loaded.dtype == np.dtype([("f0", "<u8"), ("f1", "<u8")])
    expected = np.unique(halves)  # numpy's own sort of the structured dtype
    np.testing.assert_array_equal(loaded, expected)
    np.testing.assert_array_equal(read_datacomp_subset(tmp_path / "subset.npy"), expected)
    np.save(tmp_path / "unsorted.npy", expected[::-1])
    with pytest.raises(ValueError, match="not sorted"):
        read_datacomp_subset(tmp_path / "unsorted.npy")
    np.save(tmp_path / "wrong.npy", np.arange(4, dtype=np.uint64))
    with pytest.raises(ValueError, match="dtype"):
        read_datacomp_subset(tmp_path / "wrong.npy")


def test_uid_lists_apply_after_an_exact_top_fraction(run, tmp_path):
    """DataComp's image_based ∩ clip_score: the top fraction of the whole pool, then intersected
    (not the top fraction of the intersection); a union adds listed pool rows the cut dropped."""
    run_dir, rows = run
    k = round(0.3 * len(rows))
    top = expected_top(rows, k, "clip_score")
    listed = [r["uid"] for r in rows[::4]]
    np.save(tmp_path / "listed.npy", datacomp_subset(listed))
    result = select_run(
        run_dir,
        tmp_path / "both",
        top_fraction=0.3,
        by="clip_score",
        candidate_cap=9,
        intersect=[tmp_path / "listed.npy"],
    )
    assert sorted(kept_uids(tmp_path / "both")) == sorted(set(top) & set(listed))
    assert result.selected == k and result.target == k and result.kept == len(set(top) & set(listed)) < k
    entry = result.to_json()["uid_lists"][0]
    assert entry == {
        "mode": "intersect",
        "path": str(tmp_path / "listed.npy"),
        "uids": len(set(listed)),
        "matched": len(listed),
        "outside_pool": 0,
        "removed": k - result.kept,
    }

    result = select_run(
        run_dir, tmp_path / "either", top_fraction=0.3, by="clip_score", union=[tmp_path / "listed.npy"]
    )
    assert sorted(kept_uids(tmp_path / "either")) == sorted(set(top) | set(listed))
    np.testing.assert_array_equal(np.load(tmp_path / "either" / "uids.npy"), datacomp_subset(set(top) | set(listed)))
    summary = json.loads((tmp_path / "either" / "selection.json").read_text())
    assert summary["counts"]["selected"] == k and summary["counts"]["kept"] == len(set(top) | set(listed))
    assert summary["arguments"]["union"] == [str(tmp_path / "listed.npy")]
