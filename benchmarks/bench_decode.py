"""Benchmark 1: preprocessing throughput per core, this project's path vs the reference path.

* ours: ``decode_image`` (draft-mode JPEG decode + one bicubic resize to shorter side 224)
  then ``to_pixel_values`` (centre crop + normalise);
* reference: full decode ``Image.open(...).convert("RGB")`` then transformers'
  CLIPImageProcessor with ViT-B/32 settings (resize shortest edge 224 bicubic, centre
  crop 224, normalise), as the MLM-Filter and DataComp scoring scripts do.

Both run in this one process on one core (torch threads 1) over JPEG bytes already in
memory, on the Flickr8k dev photos as they are (~500 px) and on the same photos upscaled
to ~1500 px (Lanczos, JPEG quality 90, done before timing). Prints images/s, the ratio,
and how far the two pixel tensors are apart.

    .venv/bin/python benchmarks/bench_decode.py [--repeats 5] [--batch-size 32] [--draft-gap 1.0]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mlmfilter.images.decode import DecodeSpec, decode_image
from mlmfilter.images.pixels import to_pixel_values

FLICKR_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k_dev" / "images"
SIZE = 224
UPSCALED_LONG_SIDE = 1500


def load_photos(folder: Path) -> list[bytes]:
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        sys.exit(
            f"benchmark data missing: no JPEGs in {folder}\n"
            "(this benchmark needs ../shared/data/flickr8k_dev beside the project root, or --images DIR)"
        )
    return [p.read_bytes() for p in paths]


def upscale(data: bytes, long_side: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = long_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, "JPEG", quality=90)
    return out.getvalue()


def reference_processor():
    """transformers' CLIP processor at ViT-B/32 settings (its defaults).

    Without torchvision, ``CLIPImageProcessor`` resolves to this PIL backend anyway;
    importing it by name only silences the fallback warning.
    """
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers < 5: the classic (PIL/numpy) processor
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        resample=Image.Resampling.BICUBIC,
    )


def make_paths(batch_size: int, draft_gap: float) -> dict[str, Callable[[list[bytes]], torch.Tensor]]:
    processor = reference_processor()
    spec = DecodeSpec(shorter_side=SIZE, draft_gap=draft_gap)
    mean, std = processor.image_mean, processor.image_std

    def ours(blobs: list[bytes]) -> torch.Tensor:
        out = []
        for start in range(0, len(blobs), batch_size):
            images = [decode_image(b, spec)[0] for b in blobs[start : start + batch_size]]
            out.append(to_pixel_values(images, SIZE, mean, std))
        return torch.cat(out)

    def reference(blobs: list[bytes]) -> torch.Tensor:
        out = []
        for start in range(0, len(blobs), batch_size):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs[start : start + batch_size]]
            out.append(processor(images=images, return_tensors="pt")["pixel_values"])
        return torch.cat(out)

    return {"ours": ours, "reference": reference}


def best_rates(paths: dict[str, Callable[[list[bytes]], torch.Tensor]], blobs: list[bytes], repeats: int) -> dict:
    """Images per second per path, best of ``repeats``.

    The paths take turns within each repeat, so load from other tenants of the CPU hits
    both alike; the best run is the least disturbed one.
    """
    best = {label: float("inf") for label in paths}
    for _ in range(repeats):
        for label, fn in paths.items():
            t0 = time.perf_counter()
            fn(blobs)
            best[label] = min(best[label], time.perf_counter() - t0)
    return {label: len(blobs) / seconds for label, seconds in best.items()}


def run_case(name: str, blobs: list[bytes], paths: dict, repeats: int) -> dict:
    ours_out, ref_out = paths["ours"](blobs), paths["reference"](blobs)  # also warms up
    diff = (ours_out - ref_out).abs()
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    rates = best_rates(paths, blobs, repeats)
    return {
        "case": name,
        "images": len(blobs),
        "median_long_side": int(np.median([max(s) for s in sizes])),
        "ours": rates["ours"],
        "reference": rates["reference"],
        "ratio": rates["ours"] / rates["reference"],
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=FLICKR_IMAGES, help="folder of real JPEG photos")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--draft-gap", type=float, default=DecodeSpec.draft_gap, help="DecodeSpec.draft_gap")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # per-core throughput

    photos = load_photos(args.images)
    upscaled = [upscale(b, UPSCALED_LONG_SIDE) for b in photos]
    paths = make_paths(args.batch_size, args.draft_gap)
    print(
        f"torch threads: {torch.get_num_threads()}, batch size {args.batch_size}, best of {args.repeats}, "
        f"draft_gap {args.draft_gap}"
    )
    columns = [
        "case",
        "images",
        "median long side",
        "ours (img/s)",
        "reference (img/s)",
        "ratio",
        "mean abs diff",
        "max abs diff",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, blobs in (("Flickr as is", photos), (f"upscaled to {UPSCALED_LONG_SIDE} px", upscaled)):
        r = run_case(name, blobs, paths, args.repeats)
        print(
            f"| {r['case']} | {r['images']} | {r['median_long_side']} | {r['ours']:.1f} | {r['reference']:.1f}"
            f" | {r['ratio']:.2f}x | {r['mean_abs_diff']:.4f} | {r['max_abs_diff']:.3f} |"
        )


if __name__ == "__main__":
    main()
