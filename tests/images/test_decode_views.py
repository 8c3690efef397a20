"""Scorers wanting different sizes each get the bytes decoded at their own size, in the pool as inline."""

from __future__ import annotations

import numpy as np

from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_image, decode_sample
from mlmfilter.images.pool import ImageDecoder


def test_each_side_is_its_own_decode_of_the_bytes(flickr_pairs):
    spec = DecodeSpec.for_sides([224, 28, None, 224, 384])
    assert spec.shorter_side == 384 and spec.sides == (28, 224, 384)
    samples = [
        Sample(uid=f"{n:032x}", shard="s", key=str(n), image_bytes=p.read_bytes())
        for n, (p, _) in enumerate(flickr_pairs[:3])
    ]
    data = [s.image_bytes for s in samples]
    with ImageDecoder(spec, workers=1) as pool:
        pooled = list(
            pool.decode([Sample(uid=s.uid, shard="s", key=s.key, image_bytes=s.image_bytes) for s in samples])
        )
    for sample, bytes_, from_pool in zip(samples, data, pooled):
        decode_sample(sample, spec)
        for side in (28, 224, 384):
            alone, _, _ = decode_image(bytes_, DecodeSpec(shorter_side=side))
            assert np.array_equal(np.asarray(sample.image_at(side)), np.asarray(alone)), side
            assert np.array_equal(np.asarray(from_pool.image_at(side)), np.asarray(alone)), side
        assert sample.image is sample.views[384]  # the largest is the sample's image
        assert min(sample.image_at(28).size) == 28


def test_one_side_keeps_the_one_image():
    spec = DecodeSpec.for_sides([224])
    assert spec.shorter_side == 224 and spec.sides == ()
    assert DecodeSpec.for_sides([], shorter_side=64).shorter_side == 64
