"""Hostile or broken input ends a command with one `error:` line and exit 2, never a traceback: deeply nested
JSON, binary files, YAML python tags (never constructed), a 5000-deep --where, a --captions table of the
wrong shape, and object storage without credentials."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards, write_shard

#: would run a command if a loader ever constructed python objects
PYTHON_TAG = "!!python/object/apply:os.system ['touch {marker}']"


def _invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def _one_error_line(result, *needles: str) -> str:
    """The command failed with exit 2 and said why in exactly one line (no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def selected(tmp_path_factory, flickr_pairs):
    """A scored run of real Flickr pairs (rules) and a selection of it."""
    root = tmp_path_factory.mktemp("hostile")
    flickr_shards(flickr_pairs[:6], root / "in", n_shards=1, per_shard=6)
    assert _invoke("score", root / "in" / "00000000.tar", "-o", root / "run", "--scorer", "rules").exit_code == 0
    assert _invoke("select", root / "run", "--top-fraction", "1", "--by", "rules_chars").exit_code == 0
    return root


# -- deeply nested and binary files -------------------------------------------------------------------


def test_deeply_nested_or_binary_instruction_data_is_refused_naming_the_file(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    _one_error_line(_invoke("train", nested, "-o", tmp_path / "out", "--base", "no-such-base"), "nested.json")
    binary = tmp_path / "weights.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 100)
    _one_error_line(_invoke("train", binary, "-o", tmp_path / "out", "--base", "no-such-base"), "weights.json", "UTF-8")


# -- YAML python tags: refused, never constructed ----------------------------------------------------------


def test_python_tags_in_a_recipe_or_an_option_are_refused_and_never_run(tmp_path, selected):
    marker = tmp_path / "ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"inputs: [{selected / 'in' / '00000000.tar'}]\noutput: {tmp_path / 'run'}\nworkers: {PYTHON_TAG.format(marker=marker)}\n"
    )
    _one_error_line(_invoke("score", "--recipe", recipe), "recipe.yaml")
    option = "rules.min_words=" + PYTHON_TAG.format(marker=marker)
    _one_error_line(
        _invoke(
            "score", selected / "in" / "00000000.tar", "-o", tmp_path / "run", "--scorer", "rules", "--option", option
        ),
        "--option",
    )
    _one_error_line(_invoke("eval", "corrupt", selected / "in" / "00000000.tar", "--option", option), "--option")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_python_tag_in_run_yaml_is_refused_naming_the_file(tmp_path, selected):
    run = tmp_path / "run"
    shutil.copytree(selected / "run", run)
    marker = tmp_path / "ran"
    record = (run / "run.yaml").read_text()
    (run / "run.yaml").write_text(record + f"hook: {PYTHON_TAG.format(marker=marker)}\n")
    _one_error_line(_invoke("select", run, "--where", "rules_ok", "-o", tmp_path / "sel"), "run.yaml")
    _one_error_line(_invoke("score", selected / "in" / "00000000.tar", "-o", run), "run.yaml")
    assert not marker.exists()


# -- a 5000-deep --where --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where", ["(" * 5000 + "rules_ok" + ")" * 5000, "not " * 5000 + "rules_ok", "-" * 5000 + "rules_chars > 1"]
)
def test_a_5000_deep_where_is_one_line(tmp_path, selected, where):
    line = _one_error_line(_invoke("select", selected / "run", "--where", where, "-o", tmp_path / "sel"))
    assert len(line) < 400  # the expression is quoted cut short, not 10000 characters of it


# -- reshard --captions of the wrong shape --------------------------------------------------------------


def test_reshard_captions_with_an_integer_or_missing_column_is_one_line(tmp_path, selected):
    uids = pq.read_table(selected / "run" / "selection" / "kept.parquet", columns=["uid"])["uid"].to_pylist()
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"uid": uids, "caption": list(range(len(uids)))}), numbers)
    line = _one_error_line(_invoke("reshard", selected / "run" / "selection", tmp_path / "out1", "--captions", numbers))
    assert "'caption'" in line and "int64" in line and "not text" in line
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"uid": uids, "text": ["a new caption"] * len(uids)}), other)
    line = _one_error_line(_invoke("reshard", selected / "run" / "selection", tmp_path / "out2", "--captions", other))
    assert "no column 'caption'" in line and "uid, text" in line and "--caption-column" in line
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    result = _invoke(
        "reshard", selected / "run" / "selection", tmp_path / "out3", "--captions", other, "--caption-column", "text"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["captions_replaced"] == len(uids)


# -- object storage without credentials ---------------------------------------------------------------

NO_AWS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_DEFAULT_PROFILE": None,
    "AWS_WEB_IDENTITY_TOKEN_FILE": None,
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookup (nothing outside is reached)
    "FSSPEC_S3_ANON": None,
}


def test_s3_without_credentials_names_them_and_how_to_give_them(tmp_path):
    pytest.importorskip("s3fs")
    result = _invoke("score", "s3://mlmfilter-test-no-such-bucket/00000.tar", "-o", tmp_path / "run", env=NO_AWS)
    _one_error_line(result, "no AWS credentials", "AWS_ACCESS_KEY_ID", "FSSPEC_S3_ANON=true")
    result = _invoke(
        "select", "s3://mlmfilter-test-no-such-bucket/run", "--where", "rules_ok", "-o", tmp_path / "sel", env=NO_AWS
    )
    _one_error_line(result, "no AWS credentials", "AWS_PROFILE")


def test_a_deeply_nested_sample_json_is_that_pairs_bad_metadata(tmp_path, flickr_pairs):
    image, caption = flickr_pairs[0]
    shard = tmp_path / "in" / "00000000.tar"
    write_shard(
        shard,
        [
            {"key": "a", "jpg": image.read_bytes(), "txt": caption},
            {"key": "b", "jpg": image.read_bytes(), "txt": caption},
        ],
    )
    with tarfile.open(shard, "a") as tar:
        data = ("[" * 100_000 + "]" * 100_000).encode()
        info = tarfile.TarInfo("b.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = _invoke("score", shard, "-o", tmp_path / "run", "--scorer", "rules")
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "run" / "score" / "tables" / "00000000.parquet").to_pylist()}
    assert rows["a"]["error"] is None and rows["b"]["error"] == "bad_metadata"
    assert "nests too deeply" in rows["b"]["error_detail"]
