"""Selecting over several runs joined on uid, and external uid lists (--intersect / --union)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter import api
from mlmfilter.cli.app import app
from mlmfilter.runs.runner import write_tables
from mlmfilter.selection import SelectionError, select_run
from tests.support.builders import flickr_shards, scores_dataset

RNG = np.random.default_rng(7)
UIDS = ["".join(RNG.choice(list("0123456789abcdef"), 32)) for _ in range(400)]
IDENTITY = [("uid", pa.string()), ("shard", pa.string()), ("key", pa.string())]
ERRORS = [("error", pa.string()), ("error_detail", pa.string())]


def write_synthetic_run(root: Path, rows: list[dict], columns: list[tuple[str, pa.DataType]], shards: int = 3) -> None:
    schema = pa.schema(IDENTITY + columns + ERRORS)
    tables = {}
    for shard in range(shards):
        part = rows[shard::shards]
        for i, row in enumerate(part):
            row.setdefault("shard", f"{shard:08d}")
            row.setdefault("key", f"{shard:04d}{i:04d}")
        tables[f"{shard:08d}"] = pa.Table.from_pylist(part, schema=schema)
    write_tables(root, "score", tables)


@pytest.fixture()
def three_runs(tmp_path):
    """rules over uids 0-299, clip over 100-399 (one uid twice), mlm over 50-349; error rows in each."""
    rules = []
    for i in range(0, 300):
        error = "undecodable_image" if i % 37 == 0 else None
        rules.append(
            {
                "uid": UIDS[i],
                "rules_ok": None if error else bool(i % 3),
                "rules_words": None if error else i % 20,
                "error": error,
                "error_detail": f"rules saw {error}" if error else None,
            }
        )
    clip = []
    for i in range(100, 400):
        error = "truncated_image" if i % 41 == 0 else None
        cosine = None if error else float(np.float32(round((i * 7919 % 101) / 250, 3)))
        clip.append({"uid": UIDS[i], "clip_cosine": cosine, "error": error, "error_detail": None})
    # a repeated uid: its first row (shard order) is the one joined, the repeat is counted
    clip[161 - 100]["clip_cosine"] = -0.5
    clip.insert(0, {"uid": UIDS[161], "clip_cosine": 0.39, "error": None, "error_detail": None})
    mlm = [{"uid": UIDS[i], "itm": float(i % 100), "error": None, "error_detail": None} for i in range(50, 350)]
    write_synthetic_run(tmp_path / "rules", rules, [("rules_ok", pa.bool_()), ("rules_words", pa.int64())])
    write_synthetic_run(tmp_path / "clip", clip, [("clip_cosine", pa.float32())], shards=1)
    write_synthetic_run(tmp_path / "mlm", mlm, [("itm", pa.float32())], shards=2)
    joined = {}
    for name, rows in (("rules", rules), ("clip", clip), ("mlm", mlm)):
        for row in rows:
            entry = joined.setdefault(row["uid"], {"runs": set()})
            if name in entry["runs"]:
                continue  # a repeat: the first row counts
            entry["runs"].add(name)
            entry.setdefault("error", None)
            entry["error"] = entry["error"] or row["error"]
            entry.update({k: v for k, v in row.items() if k not in ("uid", "shard", "key", "error", "error_detail")})
    return [tmp_path / "rules", tmp_path / "clip", tmp_path / "mlm"], joined


def kept_uids(folder: Path) -> list[str]:
    return pq.read_table(folder / "kept.parquet")["uid"].to_pylist()


def in_all(entry: dict) -> bool:
    return entry["runs"] == {"rules", "clip", "mlm"}


def test_expression_over_three_joined_runs(three_runs, tmp_path):
    runs, joined = three_runs
    select_run(runs, tmp_path / "sel", expression="itm >= 60 and clip_cosine >= 0.2 and rules_ok", batch_rows=64)
    expected = {
        u
        for u, e in joined.items()
        if in_all(e)
        and e.get("rules_ok")
        and e.get("itm") is not None
        and e["itm"] >= 60
        and e.get("clip_cosine") is not None
        and e["clip_cosine"] >= np.float32(0.2)
    }
    assert 0 < len(expected) < 100
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    assert UIDS[161] in expected  # joined by its first row (0.39), not its repeat (-0.5)
    kept = pq.read_table(tmp_path / "sel" / "kept.parquet")
    assert kept.column_names == ["uid", "shard", "key", "itm", "clip_cosine", "rules_ok"]
    # shard and key are the first run's: reshard reads the first run's shards
    rules_rows = {r["uid"]: r for r in scores_dataset(runs[0]).to_table().to_pylist()}
    assert all(rules_rows[r["uid"]]["key"] == r["key"] for r in kept.to_pylist())

    summary = json.loads((tmp_path / "sel" / "selection.json").read_text())
    counts = summary["counts"]
    assert counts["read"] == 400  # the pool: the union of the runs' uids
    assert counts["in_every_run"] == 200  # uids 100-299
    assert counts["missing"] == {str(runs[0]): 100, str(runs[1]): 100, str(runs[2]): 100}
    assert counts["kept"] == len(expected)
    assert [r["run_dir"] for r in summary["runs"]] == [str(r) for r in runs]
    assert summary["runs"][1]["duplicate_uids"] == 1 and summary["runs"][1]["columns"] == ["clip_cosine"]
    assert any("repeated uids" in note for note in summary["notes"])
    assert summary["run_dir"] == str(runs[0]) and summary["arguments"]["runs"] == [str(r) for r in runs]


@pytest.mark.parametrize("cache_rows", [0, 10**9])  # lookups recomputed on every pass, or kept
def test_top_fraction_of_the_joined_pool(three_runs, tmp_path, monkeypatch, cache_rows):
    monkeypatch.setattr("mlmfilter.selection.join.LOOKUP_CACHE_ROWS", cache_rows)
    runs, joined = three_runs
    result = select_run(
        runs, tmp_path / "sel", expression="rules_ok", top_fraction=0.1, by="itm", candidate_cap=7, batch_rows=50
    )
    qualifying = [(u, e) for u, e in joined.items() if in_all(e) and e.get("rules_ok") and e.get("itm") is not None]
    qualifying.sort(key=lambda ue: (-ue[1]["itm"], int(ue[0], 16)))
    k = round(0.1 * 400)
    assert result.target == k and result.kept == k
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(u for u, _ in qualifying[:k])
    assert result.threshold["tied_kept"] <= result.threshold["tied_rows"]


def test_errors_of_any_run_show_and_missing_rows_never_pass(three_runs, tmp_path):
    runs, joined = three_runs
    result = select_run(runs, tmp_path / "sel", expression="error == 'truncated_image'")
    expected = {u for u, e in joined.items() if in_all(e) and e["error"] == "truncated_image"}
    assert expected and sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    # the first run's error wins where both have one; errors are counted over the first run's rows
    assert result.errors["undecodable_image"] == len([i for i in range(300) if i % 37 == 0])
    result = select_run(runs, tmp_path / "detail", expression="error_detail == 'rules saw undecodable_image'")
    assert sorted(kept_uids(tmp_path / "detail")) == sorted(
        u for u, e in joined.items() if in_all(e) and e["error"] == "undecodable_image"
    )
    assert result.kept > 0
    # an expression over one run's columns still needs the uid in every run
    select_run(runs, tmp_path / "only_rules", expression="rules_ok")
    assert sorted(kept_uids(tmp_path / "only_rules")) == sorted(
        u for u, e in joined.items() if in_all(e) and e.get("rules_ok")
    )


def test_the_order_of_the_runs_does_not_change_the_kept_set(three_runs, tmp_path):
    runs, _ = three_runs
    select_run(runs, tmp_path / "a", expression="itm >= 30 and clip_cosine > 0.1")
    result = select_run(runs[::-1], tmp_path / "b", expression="itm >= 30 and clip_cosine > 0.1")
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "uids.npy"), np.load(tmp_path / "b" / "uids.npy"))
    assert result.read == 400  # rules-only uids count in the pool although the mlm run drives


def test_column_clash_is_refused_and_named_runs_tell_them_apart(three_runs, tmp_path):
    runs, joined = three_runs
    with pytest.raises(SelectionError, match=r"column 'clip_cosine' is in two runs .*clip.*clip") as info:
        select_run([runs[1], runs[1]], tmp_path / "sel", expression="clip_cosine > 0")
    assert "a=RUN1 b=RUN2" in str(info.value) and "a_clip_cosine and b_clip_cosine" in str(info.value)
    result = select_run(
        [("old", runs[1]), ("new", runs[1]), runs[2]],
        tmp_path / "sel",
        expression="old_clip_cosine > 0.3 and new_clip_cosine > 0.3 and itm >= 0",
    )
    expected = {
        u for u, e in joined.items() if {"clip", "mlm"} <= e["runs"] and (e.get("clip_cosine") or 0) > np.float32(0.3)
    }
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(expected)
    assert result.runs[0]["name"] == "old" and result.runs[0]["columns"] == ["old_clip_cosine"]
    with pytest.raises(ValueError, match="unknown column 'clip_cosine'. Did you mean 'old_clip_cosine'"):
        select_run([("old", runs[1]), runs[2]], tmp_path / "sel2", expression="clip_cosine > 0")


def test_incomplete_runs_are_refused_unless_allowed(three_runs, tmp_path):
    runs, _ = three_runs
    (runs[2] / "score" / "completions" / "00000001.json").unlink()
    with pytest.raises(SelectionError, match=f"stage 'score' of {runs[2]} is incomplete: 1 of 2"):
        select_run(runs, tmp_path / "sel", expression="itm >= 0")
    result = select_run(runs, tmp_path / "sel", expression="itm >= 0", allow_incomplete=True)
    assert any(f"incomplete run {runs[2]}" in note for note in result.notes)
    assert result.runs[2]["completeness"]["shards_done"] == 1


def test_several_runs_need_an_output_folder(three_runs):
    runs, _ = three_runs
    with pytest.raises(ValueError, match="needs an output folder"):
        api.select(runs, expression="itm >= 0")


# -- external uid lists -------------------------------------------------------------------------------


def datacomp_subset(uids) -> np.ndarray:
    """How DataComp's baselines build a subset file."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort()
    return arr


def test_intersect_and_union_with_uid_lists(three_runs, tmp_path):
    runs, joined = three_runs
    selected = {u for u, e in joined.items() if e["runs"] >= {"rules"} and e.get("rules_ok")}
    dfn = set(UIDS[0:400:3]) | {"f" * 32}  # a uid no run holds
    published = set(UIDS[0:400:2])
    np.save(tmp_path / "dfn.npy", datacomp_subset(dfn))
    named = np.zeros(len(published), dtype=[("uid_0", "<u8"), ("uid_1", "<u8")])  # other field names
    named["uid_0"], named["uid_1"] = datacomp_subset(published)["f0"], datacomp_subset(published)["f1"]
    np.save(tmp_path / "published.npy", named)
    extra = UIDS[350:355]
    np.save(tmp_path / "extra.npy", np.array([u.upper() for u in extra]))  # plain strings, any case

    result = select_run(
        runs[0],
        tmp_path / "sel",
        expression="rules_ok",
        intersect=[tmp_path / "dfn.npy", tmp_path / "published.npy"],
        union=[tmp_path / "extra.npy"],
    )
    # extra uids are outside the rules run (its pool): counted, not added
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(selected & dfn & published)
    lists = {e["path"]: e for e in result.to_json()["uid_lists"]}
    assert lists[str(tmp_path / "dfn.npy")]["outside_pool"] == len([u for u in dfn if u not in UIDS[:300]])
    assert lists[str(tmp_path / "extra.npy")] == {
        "mode": "union",
        "path": str(tmp_path / "extra.npy"),
        "uids": 5,
        "matched": 0,
        "outside_pool": 5,
        "added": 0,
    }
    assert result.selected == len(selected) and result.kept == len(selected & dfn & published)

    # SU >= 85 ∪ DFN, Open-Qwen2VL style, over the joined runs
    np.save(tmp_path / "dfn_small.npy", datacomp_subset(UIDS[100:110]))
    result = select_run(runs, tmp_path / "union", expression="itm >= 95", union=[tmp_path / "dfn_small.npy"])
    by_expression = {u for u, e in joined.items() if in_all(e) and e.get("itm") is not None and e["itm"] >= 95}
    assert sorted(kept_uids(tmp_path / "union")) == sorted(by_expression | set(UIDS[100:110]))
    assert np.array_equal(np.load(tmp_path / "union" / "uids.npy"), datacomp_subset(by_expression | set(UIDS[100:110])))


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda p: np.save(p, np.array([{"uid": 1}], dtype=object), allow_pickle=True), "Python objects"),
        (lambda p: p.write_text("uid\n" + UIDS[0] + "\n"), "not a .npy file"),
        (lambda p: np.save(p, np.arange(4, dtype=np.float64)), "dtype float64"),
        (lambda p: np.save(p, np.array([UIDS[0], "abc"])), "row 1 is not hex"),
        (lambda p: np.save(p, np.array(["x" * 40])), "32 characters"),
        (lambda p: np.savez(p, a=np.arange(3)), ".npz archive"),
    ],
)
def test_malformed_uid_list_is_one_clear_error(three_runs, tmp_path, content, message):
    runs, _ = three_runs
    path = tmp_path / "list.npy"
    content(path)
    if not path.exists():  # np.savez appends .npz
        path = tmp_path / "list.npy.npz"
    with pytest.raises(SelectionError, match=message) as info:
        select_run(runs[0], tmp_path / "sel", expression="rules_ok", intersect=[path])
    assert str(path) in str(info.value)
    assert not (tmp_path / "sel").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        select_run(runs[0], tmp_path / "sel", expression="rules_ok", union=[tmp_path / "nope.npy"])


# -- the command line, and resharding a joined selection from real shards ----------------------------


def test_cli_joins_runs_and_reshards_the_kept_pairs(tmp_path, flickr_pairs):
    shards = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=3, per_shard=5)
    runner = CliRunner()
    result = runner.invoke(
        app, ["score", str(tmp_path / "in" / "*.tar"), "-o", str(tmp_path / "rules"), "--scorer", "rules"]
    )
    assert result.exit_code == 0, result.output
    rules = scores_dataset(tmp_path / "rules").to_table().to_pylist()
    # a judge run made elsewhere over shards 1-2 only, plus a pair the rules run never read
    judged = [r for r in rules if r["shard"] != "00000000"]
    judge_rows = [
        {"uid": r["uid"], "itm": float(i * 10), "error": None, "error_detail": None} for i, r in enumerate(judged)
    ]
    judge_rows.append({"uid": "0" * 32, "itm": 99.0, "error": None, "error_detail": None})
    write_synthetic_run(tmp_path / "judge", judge_rows, [("itm", pa.float32())], shards=2)

    no_output = runner.invoke(app, ["select", str(tmp_path / "rules"), str(tmp_path / "judge"), "--where", "itm >= 0"])
    assert no_output.exit_code == 2 and "needs an output folder" in no_output.output
    not_a_run = runner.invoke(app, ["select", str(tmp_path / "rules"), "itm >= 30", "-o", str(tmp_path / "x")])
    assert not_a_run.exit_code == 2 and "--where" in not_a_run.output

    result = runner.invoke(
        app,
        [
            "select",
            str(tmp_path / "rules"),
            str(tmp_path / "judge"),
            "--where",
            "rules_ok and itm >= 30",
            "-o",
            str(tmp_path / "sel"),
        ],
    )
    assert result.exit_code == 0, result.output
    itm = {r["uid"]: r["itm"] for r in judge_rows}
    expected = {r["uid"] for r in rules if r["rules_ok"] and itm.get(r["uid"], -1) >= 30}
    assert 0 < len(expected) < len(rules)
    assert set(kept_uids(tmp_path / "sel")) == expected
    summary = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert summary["counts"]["read"] == len(rules) + 1
    assert summary["counts"]["missing"] == {str(tmp_path / "rules"): 1, str(tmp_path / "judge"): 5}

    result = runner.invoke(app, ["reshard", str(tmp_path / "sel"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = set()
    for shard in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(shard) as tar:
            written |= {
                json.loads(tar.extractfile(m).read())["uid"] for m in tar.getmembers() if m.name.endswith(".json")
            }
    assert written == expected
    assert shards  # the inputs were real WebDataset shards

    # the report of one of the runs shows the joined selection, though this run lacks `itm`
    report = runner.invoke(
        app,
        ["report", str(tmp_path / "rules"), "--selection", str(tmp_path / "sel"), "-o", str(tmp_path / "report.html")],
    )
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report.html").stat().st_size > 0


def test_uid_index_matches_the_exact_two_field_search():
    from mlmfilter.io.uid import HALVES_DTYPE, locate_sorted
    from mlmfilter.selection.subset import UidIndex, unique_sorted_halves

    rng = np.random.default_rng(3)
    keys = np.zeros(5_000, dtype=HALVES_DTYPE)
    keys["f0"] = rng.integers(0, 300, len(keys))  # many keys share an f0
    keys["f1"] = rng.integers(0, 50, len(keys))
    keys = unique_sorted_halves(keys)
    query = np.zeros(20_000, dtype=HALVES_DTYPE)
    query["f0"], query["f1"] = rng.integers(0, 320, len(query)), rng.integers(0, 60, len(query))
    found, position = UidIndex(keys).locate(query)
    expected_found, expected_position = locate_sorted(keys, query)
    assert 0 < found.sum() < len(query)
    np.testing.assert_array_equal(found, expected_found)
    np.testing.assert_array_equal(position[found], expected_position[expected_found])


def test_runs_with_uid_halves_join_runs_with_uid_strings(three_runs, tmp_path):
    """Large tables store uids as two uint64 columns; joined with string uids the result is the same."""
    runs, _ = three_runs
    tables = {}
    for path in sorted((runs[2] / "score" / "tables").glob("*.parquet")):
        table = pq.read_table(path)
        uids = table["uid"].to_pylist()
        table = table.drop_columns(["uid"])
        table = table.append_column("uid_f0", pa.array([int(u[:16], 16) for u in uids], pa.uint64()))
        table = table.append_column("uid_f1", pa.array([int(u[16:], 16) for u in uids], pa.uint64()))
        tables[path.stem] = table
    write_tables(tmp_path / "mlm_halves", "score", tables)
    where = "itm >= 40 and rules_ok and clip_cosine > 0.1"
    select_run(runs, tmp_path / "strings", expression=where, top_fraction=0.1, by="itm")
    select_run(
        [runs[0], runs[1], tmp_path / "mlm_halves"], tmp_path / "mixed", expression=where, top_fraction=0.1, by="itm"
    )
    select_run(
        [tmp_path / "mlm_halves", runs[0], runs[1]],
        tmp_path / "halves_first",
        expression=where,
        top_fraction=0.1,
        by="itm",
    )
    expected = np.load(tmp_path / "strings" / "uids.npy")
    assert len(expected) > 10
    np.testing.assert_array_equal(np.load(tmp_path / "mixed" / "uids.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "halves_first" / "uids.npy"), expected)


def test_skipped_in_any_run_is_skipped_in_the_join(tmp_path):
    """Cascade stages mark pairs they did not score `skipped`; joined, a pair skipped anywhere is skipped."""
    uids = UIDS[:12]
    first = [
        {"uid": u, "clip_cosine": 0.3, "skipped": i % 3 == 0, "error": None, "error_detail": None}
        for i, u in enumerate(uids)
    ]
    second = [
        {"uid": u, "itm": None if i % 4 == 0 else 50.0, "skipped": i % 4 == 0, "error": None, "error_detail": None}
        for i, u in enumerate(uids)
    ]
    write_synthetic_run(tmp_path / "a", first, [("clip_cosine", pa.float32()), ("skipped", pa.bool_())], shards=2)
    write_synthetic_run(tmp_path / "b", second, [("itm", pa.float32()), ("skipped", pa.bool_())], shards=2)
    select_run([tmp_path / "a", tmp_path / "b"], tmp_path / "sel", expression="skipped")
    assert sorted(kept_uids(tmp_path / "sel")) == sorted(u for i, u in enumerate(uids) if i % 3 == 0 or i % 4 == 0)
    select_run([tmp_path / "b", tmp_path / "a"], tmp_path / "not", expression="not skipped and clip_cosine > 0")
    assert sorted(kept_uids(tmp_path / "not")) == sorted(u for i, u in enumerate(uids) if i % 3 and i % 4)
