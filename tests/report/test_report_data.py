"""Distributions from streaming passes, and samples read back from shards by key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from mlmfilter.io.lookup import lookup_samples
from mlmfilter.io.sources import expand_inputs
from mlmfilter.report.profile import FINE_BINS, profile_columns
from mlmfilter.report.thumbnails import ThumbnailMaker
from tests.support.builders import write_shard


def _table(values: np.ndarray, flags: np.ndarray | None = None) -> ds.Dataset:
    n = len(values)
    columns = {
        "uid": [f"{i:032x}" for i in range(n)],
        "shard": ["s"] * n,
        "key": [str(i) for i in range(n)],
        "score": pa.array(values, mask=np.isnan(values)),
        "error": [None] * n,
        "error_detail": [None] * n,
    }
    return ds.dataset(pa.table(columns))


def test_quantiles_and_kept_fraction_match_numpy_within_a_bin():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(50, 15, 5000), rng.uniform(0, 10, 1000)])
    values[::97] = np.nan  # missing values (errored rows) are counted apart
    profile = profile_columns(_table(values), ["score"], batch_rows=700)["score"]
    valid = values[~np.isnan(values)]
    bin_width = (valid.max() - valid.min()) / FINE_BINS
    assert profile.count == len(valid) and profile.missing == len(values) - len(valid)
    assert profile.low == valid.min() and profile.high == valid.max()
    assert profile.mean == pytest.approx(valid.mean())
    ordered = np.sort(valid)
    for q in (0.01, 0.1, 0.25, 0.5, 0.9, 0.99):
        # within one bin of the ceil(q n)-th smallest value (numpy's quantile lies next to it)
        order_statistic = ordered[int(np.ceil(q * len(valid))) - 1]
        assert abs(profile.quantile(q) - order_statistic) <= bin_width * 1.0001
        assert (
            abs(profile.quantile(q) - np.quantile(valid, q))
            <= abs(order_statistic - ordered[int(q * len(valid)) - 1]) + bin_width
        )
    # kept fraction is of all rows (missing ones are never kept), exact at bin edges
    edges, fraction = profile.kept_curve()
    for i in (0, 100, 2000, FINE_BINS - 1):
        assert fraction[i] == pytest.approx((valid >= edges[i]).sum() / len(values), abs=1 / len(values))
    assert profile.kept_fraction(valid.max()) == pytest.approx((valid == valid.max()).sum() / len(values))
    assert profile.kept_fraction(valid.min()) == pytest.approx(len(valid) / len(values))
    ranks = profile.percentile_rank(np.array([np.quantile(valid, 0.3)]))
    assert ranks[0] == pytest.approx(0.3, abs=0.01)


def test_a_column_with_one_value_and_an_empty_column():
    values = np.full(10, 7.0)
    profile = profile_columns(_table(values), ["score"])["score"]
    assert profile.quantile(0.5) == 7.0 and profile.kept_fraction(7.0) == pytest.approx(1.0)
    empty = profile_columns(_table(np.full(4, np.nan)), ["score"])["score"]
    assert empty.empty and empty.quantile(0.5) is None and empty.missing == 4


def _jpeg(color) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (320, 200), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_lookup_reads_only_the_wanted_keys_one_pass_per_shard(tmp_path, monkeypatch):
    for s in range(2):
        write_shard(
            tmp_path / f"{s:05d}.tar",
            [{"key": f"{s}-{i}", "jpg": _jpeg((40 * i, 100, 200)), "txt": f"caption {s}-{i}"} for i in range(5)],
        )
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:-3000])  # a cut tail
    sources = {src.id: src for src in expand_inputs(str(tmp_path / "*.tar"))}

    import mlmfilter.io.lookup as lookup_module

    opened = []
    real_read = lookup_module.read_shard
    monkeypatch.setattr(
        lookup_module, "read_shard", lambda src, opts=None: opened.append(src.id) or real_read(src, opts)
    )
    wanted = [("00000", "0-3"), ("00000", "0-1"), ("00001", "1-0"), ("00000", "no-such-key"), ("gone", "x")]
    found = lookup_samples(sources, wanted, ThumbnailMaker(64))
    assert sorted(opened) == ["00000", "00001"]  # one pass per shard
    assert found[("00000", "0-3")].caption == "caption 0-3"
    thumb = found[("00000", "0-1")].thumbnail
    assert thumb.startswith("data:image/jpeg;base64,")
    assert (found[("00000", "0-1")].width, found[("00000", "0-1")].height) == (320, 200)
    # the first key of the damaged shard is found: the read stopped before the cut
    assert found[("00001", "1-0")].caption == "caption 1-0"
    assert sorted(found.missing) == [("00000", "no-such-key"), ("gone", "x")]
    assert "gone" in found.shard_errors


def test_thumbnail_of_broken_bytes_says_why(tmp_path):
    from mlmfilter.core.sample import Sample

    shown = ThumbnailMaker()(Sample(uid="0" * 32, shard="s", key="k", caption="c", image_bytes=_jpeg("red")[:200]))
    assert shown.thumbnail is None and "truncated_image" in shown.problem and shown.caption == "c"
    long = ThumbnailMaker()(Sample(uid="0" * 32, shard="s", key="k", caption="x" * 5000, image_bytes=_jpeg("red")))
    assert len(long.caption) < 700 and "5000 characters" in long.caption and long.thumbnail
