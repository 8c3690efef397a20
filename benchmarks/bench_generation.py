"""Benchmark: writing a caption rewrite (up to 100 tokens) with the caption generator vs the judge backend.

Model (built offline by ``_smollm2.py``): llava-hf with the REAL SmolLM2-135M-Instruct as language
model and a random CLIP ViT-B/16 vision tower, so the texts are real English (not grounded in the
image) and the costs those of a real small VLM. Both approaches run in this one process on the same
loaded model, on N real Flickr8k photos with the enhancer's rewrite prompt, greedy, batch B:

* reference: ``TransformersJudgeBackend.generate`` (built to read a few score tokens: every step
  rebuilds the 4D mask over all earlier steps, O(steps^2));
* ours: ``TransformersCaptionGenerator`` (``mlmfilter.backends.generation``): the model's own KV-cached
  ``generate`` on the left-padded batch.

The texts of both are compared (same prompt ids, greedy: they must agree); printed: wall time (best
of ``--repeats``), new tokens, tokens/s and the ratio reference / ours.

    .venv/bin/python benchmarks/bench_generation.py [--pairs 4] [--batch-size 4] [--max-new-tokens 100]
                                                    [--threads 2] [--repeats 1] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import flickr_pairs, load_average  # noqa: E402
from _smollm2 import build_benchmark_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from mlmfilter.backends.generation import GenerationRequest, SamplingParams, TransformersCaptionGenerator
    from mlmfilter.backends.transformers import TransformersJudgeBackend
    from mlmfilter.enhance.prompts import EnhancePrompts
    from mlmfilter.judge.backend import JudgeRequest
    from mlmfilter.models.vlm import load_vlm

    torch.set_num_threads(args.threads)
    prompts = EnhancePrompts()
    pairs = flickr_pairs(args.pairs)
    images = [Image.open(path).convert("RGB") for path, _ in pairs]
    texts = [prompts.render_rewrite(caption) for _, caption in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "smollm2-135m-llava-random-vit-b16"
        if not (model_dir / "config.json").is_file():
            print(f"building the benchmark model in {model_dir} ...", flush=True)
            build_benchmark_model(model_dir)
        loaded = load_vlm(str(model_dir), device="cpu", dtype="fp32")
        ours = TransformersCaptionGenerator(loaded, batch_size=args.batch_size)
        reference = TransformersJudgeBackend(loaded, conversation="auto", answer_prefix="", batch_size=args.batch_size)
        params = SamplingParams(max_new_tokens=args.max_new_tokens)

        def run_ours():
            out = ours.generate([GenerationRequest(i, t) for i, t in zip(images, texts)], params)
            return [o[0].text for o in out], sum(o[0].new_tokens for o in out)

        def run_reference():
            out = reference.generate([JudgeRequest(i, [t]) for i, t in zip(images, texts)], args.max_new_tokens)
            return [o[0].strip() for o in out]

        timings: dict[str, list[float]] = {"reference": [], "ours": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref_texts = run_reference()
            timings["reference"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            our_texts, tokens = run_ours()
            timings["ours"].append(time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(ref_texts, our_texts))
    print(
        f"load average {load_average()}; {args.pairs} pairs, batch {args.batch_size}, "
        f"up to {args.max_new_tokens} new tokens, fp32, {args.threads} threads"
    )
    print(f"new tokens written: {tokens} ({tokens / args.pairs:.1f} per pair); identical texts: {same}/{args.pairs}")
    best = {name: min(values) for name, values in timings.items()}
    for name in ("reference", "ours"):
        print(f"{name:>9}: {best[name]:7.2f} s (worst {max(timings[name]):.2f} s), {tokens / best[name]:6.1f} tokens/s")
    print(f"ratio reference / ours: {best['reference'] / best['ours']:.2f}x")
    print(f"example: {our_texts[0][:160]!r}")


if __name__ == "__main__":
    main()
