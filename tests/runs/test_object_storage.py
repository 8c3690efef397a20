"""Shards and run folders on object storage: a real S3 API (moto's server on 127.0.0.1) through s3fs.

The run layer writes whole objects there (no rename, no flock): these tests check that a run, its
resume, a selection and a reshard work against a real S3 endpoint as they do on a local disk, with
the local executor and with Ray actors (which reach the bucket through the same fsspec settings).
"""

from __future__ import annotations

import socket
import tarfile

import numpy as np
import pytest

from mlmfilter import api
from mlmfilter.runs.read import RunReader
from tests.support.builders import flickr_shards, scores_dataset

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "pool"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 server on loopback; fsspec picks its endpoint up from FSSPEC_S3_* (so do Ray workers)."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import fsspec.config

        fsspec.config.conf.clear()
        fsspec.config.set_conf_env(fsspec.config.conf)  # the env was read at import: read it again
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        yield fs
    # read the environment again once it is restored: later tests must not reach this (stopped) server
    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)
    server.stop()


def _upload_shards(fs, flickr_pairs, tmp_path, prefix: str, n_shards: int, per_shard: int) -> str:
    for path in flickr_shards(flickr_pairs, tmp_path / prefix, n_shards=n_shards, per_shard=per_shard):
        fs.put_file(str(path), f"{BUCKET}/{prefix}/{path.name}")
    fs.invalidate_cache()
    return f"s3://{BUCKET}/{prefix}/*.tar"


def test_a_run_on_s3_resumes_selects_and_reshards_like_a_local_one(tmp_path, flickr_pairs, s3_endpoint):
    fs = s3_endpoint
    inputs = _upload_shards(fs, flickr_pairs, tmp_path, "local-case", n_shards=3, per_shard=4)
    run = f"s3://{BUCKET}/runs/local-case"
    local = api.score(inputs, tmp_path / "local-run", ["rules"], decode_workers=0)
    remote = api.score(inputs, run, ["rules"], decode_workers=0)
    assert remote.ok and remote.stats.rows == local.stats.rows == 12

    # every object a resume trusts is there: tables, stats, markers (marker written last)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/runs/local-case/score/completions"))
    assert len(names) == 3 and all(n.endswith(".json") for n in names)
    ours = RunReader(run).dataset("score").to_table().sort_by("uid")
    assert ours.equals(scores_dataset(tmp_path / "local-run").to_table().sort_by("uid"))

    # a deleted table object is noticed: that shard alone is redone, to the same rows
    table = next(p for p in fs.find(f"{BUCKET}/runs/local-case/score/tables") if p.endswith(".parquet"))
    fs.rm(table)
    fs.invalidate_cache()
    again = api.score(inputs, run, ["rules"], decode_workers=0)
    assert len(again.shards_completed) == 1 and len(again.shards_skipped) == 2
    assert RunReader(run).dataset("score").to_table().sort_by("uid").equals(ours)

    selection = api.select(run, tmp_path / "sel", top_fraction=0.5, by="rules_words")
    assert selection.kept == 6 and np.load(tmp_path / "sel" / "uids.npy").shape == (6,)
    stats = api.reshard(tmp_path / "sel", tmp_path / "resharded")  # reads the kept pairs back from the bucket
    assert stats["kept_uids_not_found"] == 0, stats
    with tarfile.open(next((tmp_path / "resharded").glob("*.tar"))) as tar:
        images = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert stats["kept"] == len(images) == 6


@pytest.mark.slow
def test_a_ray_run_writes_its_run_folder_to_s3(tmp_path, flickr_pairs, s3_endpoint):
    pytest.importorskip("ray")
    fs = s3_endpoint
    inputs = _upload_shards(fs, flickr_pairs, tmp_path, "ray-case", n_shards=4, per_shard=5)
    run = f"s3://{BUCKET}/runs/ray-case"
    local = api.score(inputs, tmp_path / "local-run", ["rules"], decode_workers=0)
    on_ray = api.score(
        inputs,
        run,
        ["rules"],
        decode_workers=0,
        executor="ray",
        ray={"num_actors": 2, "num_cpus": 1, "local_num_cpus": 2},
    )
    assert on_ray.ok and sorted(on_ray.shards_completed) == sorted(local.shards_completed), on_ray.shards_failed
    ours = RunReader(run).dataset("score").to_table().sort_by("uid")
    assert ours.equals(scores_dataset(tmp_path / "local-run").to_table().sort_by("uid"))
    resumed = api.score(inputs, run, ["rules"], decode_workers=0)  # the local executor trusts Ray's markers
    assert resumed.shards_completed == [] and len(resumed.shards_skipped) == 4


def test_every_command_takes_an_s3_url_as_that_url(tmp_path, flickr_pairs, s3_endpoint, monkeypatch):
    """Run folders, outputs and inputs named by s3:// URLs on the command line land in the bucket; none
    becomes a local folder named `s3:`, and what must be local says so in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    fs = s3_endpoint
    monkeypatch.chdir(tmp_path)
    inputs = _upload_shards(fs, flickr_pairs, tmp_path, "cli-case", n_shards=2, per_shard=3)

    def cli(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, (args, result.output)
        fs.invalidate_cache()
        return " ".join(result.output.split())

    run = f"s3://{BUCKET}/cli/run"
    cli("score", inputs, "-o", run, "--scorer", "rules", "--decode-workers", "0")
    assert fs.exists(f"{BUCKET}/cli/run/run.yaml")
    cli("select", run, "--where", "rules_words >= 0")  # RUN/selection, in the bucket
    assert fs.exists(f"{BUCKET}/cli/run/selection/selection.json")

    uids = RunReader(run).dataset("score").to_table()["uid"].to_pylist()
    local_list = tmp_path / "two.npy"
    np.save(local_list, np.array(uids[:2], dtype="<U32"))
    fs.put_file(str(local_list), f"{BUCKET}/cli/two.npy")
    sel = f"s3://{BUCKET}/cli/sel"
    out = cli("select", run, "--where", "rules_words >= 0", "--intersect", f"s3://{BUCKET}/cli/two.npy", "-o", sel)
    assert "kept 2" in out and fs.exists(f"{BUCKET}/cli/sel/uids.npy")
    cli("reshard", sel, f"s3://{BUCKET}/cli/shards-out")
    (written,) = fs.find(f"{BUCKET}/cli/shards-out")
    with fs.open(written, "rb") as fh, tarfile.open(fileobj=fh) as tar:
        assert len([m for m in tar.getmembers() if m.name.endswith(".jpg")]) == 2

    cli("report", run, "-o", f"s3://{BUCKET}/cli/report.html")
    cli("inspect", run, "--limit", "1", "--html", f"s3://{BUCKET}/cli/sheet.html")
    assert fs.cat_file(f"{BUCKET}/cli/report.html").startswith(b"<!")
    assert b"<html" in fs.cat_file(f"{BUCKET}/cli/sheet.html").lower()
    assert "rules_words" in cli("stats", run)

    dumps = tmp_path / "dumps"
    dumps.mkdir()
    pq.write_table(
        pa.table({"uid": uids, "key": [f"k{i}" for i in range(6)], "image_text_matching_score": ["90"] * 6}),
        dumps / "00000000_image_text_matching.parquet",
    )
    fs.put_file(
        str(dumps / "00000000_image_text_matching.parquet"), f"{BUCKET}/cli/dumps/00000000_image_text_matching.parquet"
    )
    imported = f"s3://{BUCKET}/cli/imported"
    cli("import", f"s3://{BUCKET}/cli/dumps", "-o", imported)
    assert "kept 6" in cli("select", imported, "--where", "itm >= 85", "-o", f"s3://{BUCKET}/cli/isel")
    cli("export", imported, "-o", f"s3://{BUCKET}/cli/exported")
    assert fs.exists(f"{BUCKET}/cli/exported/00000000_image_text_matching.parquet")

    for args in (
        ("teach", "sample", inputs, "-o", f"s3://{BUCKET}/cli/teach"),
        ("train", "data.json", "-o", f"s3://{BUCKET}/cli/trained", "--base", "m"),
        ("convert", str(tmp_path), f"s3://{BUCKET}/cli/converted"),
        ("demo", f"s3://{BUCKET}/cli/demo"),
    ):
        assert "must be on this machine, not s3://" in cli(*args, code=2)
    assert not (tmp_path / "s3:").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "cli-case",
        "dumps",
        "two.npy",
    ]
