"""`mlmfilter import` of hostile MLM-Filter dumps: no pair takes another's score, no row vanishes,
no traceback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader

ITM = "image_text_matching"


def _dump(folder, rows: list[dict], metric: str = ITM):
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("uid", pa.string()), ("key", pa.string()), (f"{metric}_score", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"00000000_{metric}.parquet")


def test_shared_uids_keyless_rows_and_odd_scores_become_pairs_and_error_rows_naming_file_and_row(tmp_path):
    shared = "a" * 32
    rows = [
        {"uid": shared, "key": "k0", "itm_score": "90"},
        {"uid": shared, "key": "k1", "itm_score": "10"},  # another pair with the same uid: kept apart by key
        {"uid": None, "key": None, "itm_score": "80"},  # neither a key nor a valid uid
        {"uid": "not-a-uid", "key": "", "itm_score": "70"},  # the same, with garbage
        {"uid": None, "key": None, "itm_score": "60"},
        {"uid": f"{5:032x}", "key": "k5", "itm_score": "²"},  # a digit int() refuses
    ]
    rows += [{"uid": f"{i:032x}", "key": f"k{i}", "itm_score": str(50 + i)} for i in range(6, 11)]
    _dump(tmp_path / "dumps", [{"uid": r["uid"], "key": r["key"], f"{ITM}_score": r["itm_score"]} for r in rows])
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dumps"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "imported 11 pairs" in result.output and "3 rows without a key or a valid uid" in result.output

    table = RunReader(tmp_path / "run").table("00000000", "score").to_pylist()
    assert len(table) == 11  # every row of the file is a row of the run
    by_key = {row["key"]: row for row in table if row["key"]}
    assert (by_key["k0"]["uid"], by_key["k0"]["itm"]) == (shared, 90.0)
    assert (by_key["k1"]["uid"], by_key["k1"]["itm"]) == (shared, 10.0)
    assert by_key["k5"]["error"] == "unparseable_score"
    assert "00000000_image_text_matching.parquet row 6" in by_key["k5"]["error_detail"]
    unidentified = sorted(row["error_detail"] for row in table if row["error"] == "bad_metadata")
    assert [detail.split(":")[0] for detail in unidentified] == [f"00000000_{ITM}.parquet row {n}" for n in (3, 4, 5)]


def test_two_rows_that_are_the_same_pair_are_refused_in_one_line(tmp_path):
    uid = "b" * 32
    rows = [
        {"uid": uid, "key": "k0", f"{ITM}_score": "90"},
        {"uid": f"{1:032x}", "key": "k1", f"{ITM}_score": "20"},
        {"uid": uid, "key": "k0", f"{ITM}_score": "10"},
    ]
    _dump(tmp_path / "dumps", rows)
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dumps"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "rows 1 and 3 are the same pair" in result.output and f"00000000_{ITM}.parquet" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "run.yaml").exists()


def test_a_score_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "dumps").mkdir()
    (tmp_path / "dumps" / f"00000000_{ITM}.parquet").write_bytes(b"not parquet at all")
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dumps"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"00000000_{ITM}.parquet: not a readable parquet file" in " ".join(result.output.split())
