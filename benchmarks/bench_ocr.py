"""Benchmark: OCR scorer throughput per CPU core, against rapidocr's own one-call-per-image pipeline.

Data: real Flickr8k photos (500 px long side as they ship), half of them with a string rendered in
(seeded random font, size, colour, position, rotation: ``mlmfilter.evaluation.ocr_synthetic``),
JPEG-encoded, then decoded by the pipeline's decoder at the scorer's ``image_size`` before timing.

* reference: ``rapidocr.RapidOCR()`` with its defaults (detector input scaled so its SHORTER side is at
  least 736, the 0/180 angle classifier on, lines recognised per image), one call per image;
* ours: ``OcrScorer`` at ``det_side`` 960 and 640 (detector input's LONGER side scaled to it, no
  angle classifier, the lines of a whole batch recognised together), batches of 16.

Both run onnxruntime with one intra-op thread (images/s per core) in this one process; each path
runs once untimed, then ``--repeats`` timed rounds, the paths taking turns, best kept. Also printed:
the share of text photos whose printed string each path read back completely (caption overlap 1.0),
so that speed is not bought with misses.

    .venv/bin/python benchmarks/bench_ocr.py [--photos 24] [--repeats 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from _common import ROOT, flickr_captions, load_average

sys.path.insert(0, str(ROOT / "src"))


def build_samples(n_photos: int, image_size: int):
    from PIL import Image

    from mlmfilter.core.sample import Sample
    from mlmfilter.evaluation.ocr_synthetic import PHRASES, jpeg_bytes, random_style, render_text
    from mlmfilter.images.decode import DecodeSpec, decode_image

    photos = list(flickr_captions().items())[:n_photos]
    with_text, plain = [], []
    spec = DecodeSpec(shorter_side=image_size)
    for i, (path, captions) in enumerate(photos):
        if i % 2 == 0:
            phrase = PHRASES[i % len(PHRASES)]
            rendered = render_text(Image.open(path), phrase, random_style(random.Random(f"bench/{i}")))
            data, caption, bucket = jpeg_bytes(rendered.image), phrase, with_text
        else:
            data, caption, bucket = path.read_bytes(), captions[0], plain
        image, width, height = decode_image(data, spec)
        bucket.append(
            Sample(uid=str(i), shard="bench", key=str(i), caption=caption, image=image, width=width, height=height)
        )
    return with_text, plain


def reference_engine():
    from rapidocr import RapidOCR

    return RapidOCR(
        params={
            "Global.log_level": "error",
            "EngineConfig.onnxruntime.intra_op_num_threads": 1,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
    )


def run_reference(engine, samples) -> list[list[str]]:
    import numpy as np

    out = []
    for sample in samples:
        result = engine(np.ascontiguousarray(np.asarray(sample.image)[..., ::-1]))  # ndarray input is BGR
        out.append(list(getattr(result, "txts", None) or []))
    return out


def run_ours(scorer, samples) -> list[list[str]]:
    return [row["ocr_texts"] or [] for row in scorer.score(samples)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=960)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from mlmfilter.scorers.ocr import OcrScorer, caption_overlap

    with_text, plain = build_samples(args.photos, args.image_size)
    paths: dict[str, Any] = {"reference (rapidocr defaults)": (run_reference, reference_engine())}
    for side in (960, 640):
        scorer = OcrScorer(OcrScorer.Options(det_side=side, image_size=args.image_size, threads=1, batch_size=16))
        scorer.ensure_setup()
        paths[f"ours det_side={side}"] = (run_ours, scorer)

    best: dict[tuple[str, str], float] = {}
    read_back: dict[str, float] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, (run, engine) in paths.items():
            for kind, samples in (("text", with_text), ("plain", plain)):
                t0 = time.perf_counter()
                texts = run(engine, samples)
                elapsed = time.perf_counter() - t0
                if round_ == 0:
                    if kind == "text":
                        read_back[name] = sum(
                            caption_overlap(s.caption, t) == 1.0 for s, t in zip(samples, texts)
                        ) / len(samples)
                    continue
                best[name, kind] = min(best.get((name, kind), float("inf")), elapsed)

    print(
        f"{len(with_text)} photos with text + {len(plain)} without, decoded at shorter side {args.image_size}, "
        f"1 onnxruntime thread; load average {load_average()}"
    )
    print(
        f"{'path':34s} {'text img/s':>11s} {'plain img/s':>12s} {'all img/s':>10s} {'read back':>10s} {'speedup':>8s}"
    )
    ref = "reference (rapidocr defaults)"
    results = {}
    for name in paths:
        text_rate = len(with_text) / best[name, "text"]
        plain_rate = len(plain) / best[name, "plain"]
        all_rate = (len(with_text) + len(plain)) / (best[name, "text"] + best[name, "plain"])
        ref_all = (len(with_text) + len(plain)) / (best[ref, "text"] + best[ref, "plain"])
        results[name] = {
            "text_img_s": text_rate,
            "plain_img_s": plain_rate,
            "all_img_s": all_rate,
            "read_back": read_back[name],
            "speedup": all_rate / ref_all,
        }
        print(
            f"{name:34s} {text_rate:11.2f} {plain_rate:12.2f} {all_rate:10.2f} {read_back[name]:10.2f} "
            f"{all_rate / ref_all:7.2f}x"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
