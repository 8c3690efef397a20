"""A decode worker that dies while it writes a decoded image back never hangs scoring.

The worker is really killed: by SIGKILL while it is blocked in the middle of writing a large
decoded image to its socket, and (through the pool's test-only hook, which makes the worker exit
after writing part of a result) right after part of the result's length or half of its body.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec
from mlmfilter.images.pool import TEAR_ENV, ImageDecoder
from mlmfilter.runs.read import RunReader
from tests.support.builders import flickr_shards


def _sample(key: str, data: bytes) -> Sample:
    return Sample(uid=f"{int(key):032x}", shard="s", key=key, image_bytes=data)


def _in_time(fn, seconds: float):
    """``fn()``'s result, or a failure when it does not return within ``seconds`` (a hang)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s: the decoder hangs"
    return box["value"]


def test_a_worker_killed_in_the_middle_of_writing_a_decoded_image_costs_a_retry_not_a_hang(flickr_pairs):
    noise = np.random.default_rng(0).integers(0, 256, (2400, 2400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=60)
    big = buffer.getvalue()  # decodes to 17 MB of RGB: far more than a socket holds
    small = flickr_pairs[0][0].read_bytes()
    decoder = ImageDecoder(DecodeSpec(shorter_side=None), workers=1, prefetch=4, timeout=60)
    try:
        stream = decoder.decode(iter([_sample("0", small), _sample("1", big), _sample("2", small)]))
        first = _in_time(lambda: next(stream), 60)
        assert first.ok and first.key == "0"
        (victim,) = decoder.worker_pids()
        conn = decoder._slots[0].conn
        # the worker decodes "1" and writes it back; nobody reads, so it blocks inside the body
        import select

        assert select.select([conn.fileno()], [], [], 30)[0], "the worker never started writing"
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        rest = _in_time(lambda: list(stream), 60)
        assert [s.key for s in rest] == ["1", "2"]
        assert all(s.ok for s in rest), [(s.key, s.error, s.error_detail) for s in rest]
        assert rest[0].image.size == (2400, 2400)  # decoded again, whole, by a fresh worker
        assert decoder.worker_pids() and victim not in decoder.worker_pids()
    finally:
        decoder.close()


@pytest.mark.parametrize("point", ["length", "body"])
def test_a_result_torn_at_its_length_or_in_its_body_fails_that_sample_only(photos_for_tear, monkeypatch, point):
    monkeypatch.setenv(TEAR_ENV, f"{point}:3")  # every worker dies after writing part of sample 3's result
    samples = [_sample(str(i), data) for i, data in enumerate(photos_for_tear)]
    with ImageDecoder(DecodeSpec(shorter_side=224), workers=2, prefetch=4, timeout=60) as decoder:
        results = _in_time(lambda: list(decoder.decode(iter(samples))), 120)
    assert [s.key for s in results] == [str(i) for i in range(len(samples))]
    assert {s.key: s.error for s in results if not s.ok} == {"3": errors.UNDECODABLE_IMAGE}
    assert "died while writing its result" in results[3].error_detail
    assert all(min(s.image.size) == 224 for s in results if s.ok)


@pytest.fixture(scope="module")
def photos_for_tear(flickr_pairs) -> list[bytes]:
    return [path.read_bytes() for path, _ in flickr_pairs[:8]]


def test_score_with_a_torn_decode_result_finishes_with_one_error_row(tmp_path, flickr_pairs):
    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=5)
    env = {**os.environ, TEAR_ENV: "body:000000002"}
    command = [sys.executable, "-m", "mlmfilter.cli.app", "score", str(shard), "-o", str(tmp_path / "run")]
    done = subprocess.run(
        command + ["--scorer", "rules", "--decode-workers", "1"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = RunReader(tmp_path / "run").table("00000000", "score").to_pylist()
    assert [row["error"] for row in table] == [None, None, errors.UNDECODABLE_IMAGE, None, None]
    assert "Traceback" not in done.stderr
