"""A pair's judge score depends on its image bytes, caption, metric, model, dtype and readout settings
only: not on its batch size, its batch mates, nor on the other scorers of the run (fp32, real photos,
tiny judges of every layout)."""

from __future__ import annotations

import numpy as np
import pytest

from mlmfilter.core.ids import uid_of
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_sample
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers.mlm import MLMScorer
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards
from tests.support.enhance import one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

TOLERANCE = 1e-4  # on 0..100 (and on mass, std), fp32
LONG = "; a long caption that pads its batch mates, " * 6


def _samples(pairs, side: int, tag: str) -> list[Sample]:
    samples = []
    for n, (path, caption) in enumerate(pairs):
        sample = Sample(uid=uid_of(f"{tag}{n}"), shard=tag, key=f"{n}", caption=caption, image_bytes=path.read_bytes())
        samples.append(decode_sample(sample, DecodeSpec(shorter_side=side)))
    return samples


def _columns(rows) -> np.ndarray:
    return np.array([[row[c] for c in sorted(row)] for row in rows], dtype=np.float64)


@pytest.mark.parametrize("family", ["llava", "pooled_llava", "qwen2_vl", "idefics3"])
def test_scores_do_not_depend_on_batch_size_or_batch_mates(family, flickr_pairs, smollm2_cache_dir):
    model = str(mlm_support.tiny_model_dir(family, smollm2_cache_dir))

    def judge(batch_size: int, **options) -> MLMScorer:
        options = MLMScorer.Options(
            model=model,
            metrics="itm,ctq",
            device="cpu",
            dtype="fp32",
            batch_size=batch_size,
            **mlm_support.no_mass_floor(),
            **options,
        )
        return MLMScorer(options)

    alone = judge(1)
    side = alone.image_size
    targets = [(path, caption) for path, caption in flickr_pairs[:4]]
    others = [(path, caption + (LONG if n % 2 else "")) for n, (path, caption) in enumerate(flickr_pairs[4:8])]
    reference = _columns(alone.score(_samples(targets, side, "t")))
    assert not np.allclose(reference[0], reference[1], atol=1e-3)  # different pairs really differ
    # pairs per batch, and micro-batches filled by a token budget (one pair alone, a few, all)
    scorers = [alone, judge(3), judge(8), judge(8, batch_tokens=200), judge(8, batch_tokens=1200), judge(3)]
    for scorer in scorers:
        scorer.ensure_setup()
    # as on CUDA: the scorer hands over 8 pairs, encoded 3 at a time, the next chunk in a thread
    scorers[-1].backend.prefetch_encoding, scorers[-1].batch_size = True, 8
    for scorer in scorers:
        assert scorer.backend.batch_size == scorer.options.batch_size  # its own batching, not alone's
        np.testing.assert_allclose(_columns(scorer.score(_samples(targets, side, "t"))), reference, atol=TOLERANCE)
        # mixed: other pairs (longer captions among them) before, between and after the same pairs
        mixed = _samples(others, side, "o")
        batch = [mixed[0], *_samples(targets, side, "t")[:2], mixed[1], mixed[2]]
        batch += [*_samples(targets, side, "t")[2:], mixed[3]]
        rows = scorer.score(batch)
        picked = [rows[i] for i, s in enumerate(batch) if s.shard == "t"]
        np.testing.assert_allclose(_columns(picked), reference, atol=TOLERANCE)


def test_the_judge_sees_the_same_pixels_whatever_scorers_share_the_run(
    tmp_path, flickr_pairs, smollm2_cache_dir, tiny_clip_dir
):
    """CLIP wants 224 px, the judge 28: the judge's columns are those of a run where it is alone."""
    model = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    options = {"model": model, "metrics": "itm", "device": "cpu", "dtype": "fp32", **mlm_support.no_mass_floor()}
    judge = {"name": "mlm", "options": options}
    clip = {"name": "clip", "options": {"model": str(tiny_clip_dir), "device": "cpu"}}
    inputs = [str(p) for p in flickr_shards(flickr_pairs[:6], tmp_path / "in", n_shards=1, per_shard=6)]
    tables = {}
    for name, scorers in (("alone", [judge]), ("with-clip", [clip, judge])):
        stage = ScoringStage(ScoringOptions(scorers=scorers, decode_workers=0))
        summary = run_stage(tmp_path / name, stage, sources=expand_inputs(inputs), inputs=inputs, read_options={})
        assert summary.ok, summary.shards_failed
        tables[name] = RunReader(tmp_path / name).dataset("score").to_table().sort_by("key")
    for column in ("itm", "itm_mass", "itm_std"):
        np.testing.assert_allclose(
            tables["with-clip"][column].to_numpy(), tables["alone"][column].to_numpy(), atol=TOLERANCE, rtol=0
        )
