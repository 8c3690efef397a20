"""Duplicate groups over a pool: exact (same bytes, same pixels) and semantic (SemDeDup).

The rule (also in DEVELOPERS.md, "Deduplication"): two pairs are duplicates when

1. their encoded images are the same bytes (BLAKE2b-64 digest), or
2. their decoded images have the same DCT perceptual hash (a re-encoded copy), or one within
   ``phash_bits`` bits of it among pairs of the same k-means cluster of the image embeddings (a
   resized or recompressed copy; the clusters are made for this even when ``semantic`` is off), or
3. after SemDeDup (Abbas et al. 2023): their embeddings (L2-normalised) are in the same k-means
   cluster and their cosine is at least ``threshold``.

Duplicates are joined transitively into groups (union-find). One pair per group is kept: the one
with the highest value of a column the user names (``keep_best``; a missing value is worst), else
the first by uid (as a 128-bit number); ties go to the smaller uid.

Scale (10^6-10^7 x 512 in bounded memory): embeddings are read from a ``.npy`` file by explicit
reads, never held whole. Spherical k-means (Lloyd's iterations on cosine) is fitted on a seeded
sample; k defaults to sqrt(pairs), which balances assigning (``k`` products a pair) against comparing
(a cluster's size); a pool of at most ``exact_rows`` pairs is one cluster: every pair is compared. A
pair close to the border of its cluster (its second-best centroid within ``spill_margin`` in cosine)
is compared in the second cluster too, so a duplicate on the other side of the border is not missed.
The pool is rewritten once in cluster order (``work_dir``), then each cluster's cosines are computed
in row blocks of bounded size; only each pair's nearest neighbour, and its edges above the threshold
reduced to a spanning forest per cluster, are kept.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

#: why a pair is in its group, strongest first (the ``dup_reason`` column)
REASONS = ("same_bytes", "same_pixels", "near_pixels", "semantic")
_BYTES, _PIXELS, _NEAR, _SEMANTIC, _NONE = 0, 1, 2, 3, 127


class DedupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: cosine at or above which two pairs of a cluster are duplicates (SemDeDup's 1 - eps)
    threshold: float = Field(0.95, gt=-1, le=1)
    #: k of k-means; default: sqrt(pairs) (what balances assigning against comparing), one cluster
    #: (every pair against every other) up to ``exact_rows`` pairs
    clusters: int | None = Field(None, ge=1)
    exact_rows: int = Field(10_000, ge=1)
    #: perceptual hashes at most this many bits apart (of 64) within a cluster are the same picture; -1: only equal ones
    phash_bits: int = Field(4, ge=-1, le=32)
    exact: bool = True  # same bytes / same pixels
    semantic: bool = True  # SemDeDup over the embeddings
    #: a pair is also compared in its second-nearest cluster when that centroid is this close (cosine)
    spill_margin: float = Field(0.02, ge=0, le=2)
    #: rows the centroids are fitted on, at most (a seeded sample of the pool; 65536 x 512 floats: 128 MB)
    fit_rows: int = Field(65_536, ge=1)
    seed: int = 0
    #: floats a cosine block holds at once (rows x cluster members): bounds memory for any cluster size
    block_floats: int = Field(1 << 24, ge=1024)


@dataclass
class DedupResult:
    """Per row of the pool (rows without a vector or hashes take no part: ``group`` -1)."""

    group: np.ndarray  # int64: the smallest row index of the pair's group (its own index when alone)
    size: np.ndarray  # int32: pairs in the group (1: no duplicate)
    keep: np.ndarray  # bool: the one pair kept of its group (every pair without duplicate)
    reason: np.ndarray  # int8: index into REASONS, -1 without duplicate
    nearest: np.ndarray  # int64: the most similar other row of its cluster(s), -1 when none
    nearest_cosine: np.ndarray  # float32: its cosine, NaN when none
    clusters: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> int:
        lead = (self.group >= 0) & (self.group == np.arange(len(self.group))) & (self.size > 1)
        return int(lead.sum())

    def removed(self) -> int:
        return int(((self.group >= 0) & ~self.keep).sum())


# -- where the vectors come from ---------------------------------------------------------------------


class RowSource:
    """Rows of an (n, d) matrix: an array, or a ``.npy`` file (a path) read by explicit reads (no
    memory map, so memory holds only what a step asked for)."""

    def __init__(self, matrix: np.ndarray | str | os.PathLike):
        self.array: np.ndarray | None = None
        self.path: str | None = None
        if isinstance(matrix, np.ndarray):  # a memory map too: its pages are then read through the map
            self.array = matrix
            self.n, self.d = matrix.shape
            self.dtype = matrix.dtype
            return
        path = os.fspath(matrix)
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-ordered 2-d array, got shape {shape}")
        self._open(path, shape[0], shape[1], np.dtype(dtype), offset)

    @classmethod
    def raw(cls, path: str | os.PathLike, n: int, d: int, dtype) -> "RowSource":
        """A headerless file of ``n`` rows of ``d`` values of ``dtype``."""
        source = cls.__new__(cls)
        source.array = None
        source._open(os.fspath(path), n, d, np.dtype(dtype), 0)
        return source

    def _open(self, path: str, n: int, d: int, dtype: np.dtype, offset: int) -> None:
        self.path, self.n, self.d, self.dtype, self.offset = path, n, d, dtype, offset
        self._fd = os.open(path, os.O_RDONLY)

    def rows(self, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Rows ``start:stop`` as ``dtype`` (None: as stored)."""
        if self.array is not None:
            return np.asarray(self.array[start:stop], dtype=dtype)
        row_bytes = self.d * self.dtype.itemsize
        data = os.pread(self._fd, (stop - start) * row_bytes, self.offset + start * row_bytes)
        rows = np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.d)
        return rows if dtype is None else rows.astype(dtype)

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows at sorted ``index`` as float32 (one read per row from a file)."""
        if self.array is not None:
            return np.asarray(self.array[index], dtype=np.float32)
        out = np.empty((len(index), self.d), dtype=np.float32)
        for i, row in enumerate(index):
            out[i] = self.rows(int(row), int(row) + 1)[0]
        return out

    def chunks(self, rows: int, dtype=np.float32):
        for start in range(0, self.n, rows):
            yield start, self.rows(start, min(self.n, start + rows), dtype)

    def close(self) -> None:
        if self.path is not None:
            os.close(self._fd)
            self.path = None


def require_scipy() -> None:
    try:
        import scipy.sparse.csgraph  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"mlmfilter dedup needs scipy: pip install 'mlmfilter[dedup]' ({exc})") from exc


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# -- union-find over row indices ----------------------------------------------------------------------


class Forest:
    """Union-find over row indices, vectorised: every root is the smallest index of its set."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def roots(self, x: np.ndarray) -> np.ndarray:
        r = self.parent[x]
        while True:
            up = self.parent[r]
            if np.array_equal(up, r):
                return r
            r = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        while len(a):
            ra, rb = self.roots(a), self.roots(b)
            differ = ra != rb
            if not differ.any():
                return
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))

    def flatten(self) -> np.ndarray:
        parent = self.parent
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                return parent
            parent = up


def _equal_value_edges(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row to the first row with the same value (a spanning forest of equal values)."""
    order = np.argsort(values, kind="stable")
    v, r = values[order], rows[order]
    start = np.ones(len(v), dtype=bool)
    start[1:] = v[1:] != v[:-1]
    first = r[np.maximum.accumulate(np.where(start, np.arange(len(v)), 0))]
    same = ~start
    return first[same], r[same]


# -- k-means -----------------------------------------------------------------------------------------


#: rows per centroid a k-means fit looks at, at most (faiss's ``max_points_per_centroid``)
POINTS_PER_CENTROID = 256


def _fit_centroids(x: np.ndarray, k: int, seed: int, iterations: int = 12) -> np.ndarray:
    """``k`` unit centroids of unit rows ``x``: spherical k-means (Lloyd's iterations on cosine), started
    from ``k`` seeded rows; a centroid left without rows restarts at the row its centroid fits worst.
    At most ``POINTS_PER_CENTROID * k`` rows (a seeded sample) take part."""
    from scipy.sparse import csr_matrix

    k = max(1, min(k, len(x)))
    if k == 1:
        return _normalise(x.mean(axis=0, keepdims=True))
    rng = np.random.default_rng(seed)
    if len(x) > POINTS_PER_CENTROID * k:
        x = x[np.sort(rng.choice(len(x), size=POINTS_PER_CENTROID * k, replace=False))]
    centres = x[rng.choice(len(x), size=k, replace=False)].copy()
    for _ in range(iterations):
        labels, sims, _, _ = _top2(x, centres)
        counts = np.bincount(labels, minlength=k)
        sums = np.asarray(csr_matrix((np.ones(len(x), np.float32), (labels, np.arange(len(x)))), shape=(k, len(x))) @ x)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # restart them at the rows fitted worst
            worst = np.argsort(sims)[: len(empty)]
            sums[empty] = x[worst]
        centres = _normalise(sums)
    return centres


class Clustering:
    """Spherical k-means centroids; ``assign`` gives each row its cluster and, near a border, a second."""

    def __init__(self, sample: np.ndarray, k: int, options: DedupOptions):
        self.margin = options.spill_margin
        self.centres = _fit_centroids(sample, k, options.seed)
        self.k = len(self.centres)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster, second cluster or -1) of each unit row of ``x``."""
        c1, s1, c2, s2 = _top2(x, self.centres)
        return c1.astype(np.int32), np.where(s1 - s2 <= self.margin, c2, -1).astype(np.int32)


def _top2(x: np.ndarray, centres: np.ndarray, block: int = 8192):
    """Best and second-best centre of each row (index, cosine); -1 / -inf when there is one centre."""
    n = len(x)
    i1 = np.zeros(n, dtype=np.int64)
    s1 = np.zeros(n, dtype=np.float32)
    i2 = np.full(n, -1, dtype=np.int64)
    s2 = np.full(n, -np.inf, dtype=np.float32)
    for start in range(0, n, block):
        sims = x[start : start + block] @ centres.T
        rows = np.arange(len(sims))
        if centres.shape[0] == 1:
            s1[start : start + block] = sims[:, 0]
            continue
        top = np.argpartition(-sims, 1, axis=1)[:, :2]
        a, b = top[:, 0], top[:, 1]
        swap = sims[rows, b] > sims[rows, a]
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        i1[start : start + block], s1[start : start + block] = a, sims[rows, a]
        i2[start : start + block], s2[start : start + block] = b, sims[rows, b]
    return i1, s1, i2, s2


# -- the search --------------------------------------------------------------------------------------


def default_clusters(n: int, options: DedupOptions) -> int:
    if options.clusters:
        return options.clusters
    return 1 if n <= options.exact_rows else max(1, round(math.sqrt(n)))


def find_duplicates(
    vectors: np.ndarray | str | os.PathLike | None,
    valid: np.ndarray,
    *,
    uid_halves: np.ndarray,
    digests: np.ndarray | None = None,
    phashes: np.ndarray | None = None,
    hashed: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    options: DedupOptions | None = None,
    work_dir: str | os.PathLike | None = None,
) -> DedupResult:
    """Duplicate groups of the ``n`` pairs of a pool.

    ``vectors``: (n, d) embeddings (an array, or a ``.npy`` path read in blocks), None for exact
    duplicates only; ``valid``: rows that take part. ``uid_halves``: each row's uid (ties, and "the
    first by uid"). ``digests`` / ``phashes``: uint64 hashes, ``hashed`` the rows that have them.
    ``scores``: the ``keep_best`` column (higher is better, NaN worst). ``work_dir`` holds the
    pool rewritten in cluster order (a temporary folder when None).
    """
    options = options or DedupOptions()
    require_scipy()
    started = time.perf_counter()
    n = len(valid)
    forest = Forest(n)
    reason = np.full(n, _NONE, dtype=np.int8)
    nearest = np.full(n, -1, dtype=np.int64)
    nearest_cosine = np.full(n, np.nan, dtype=np.float32)
    stats: dict[str, Any] = {"pairs": n, "with_vectors": int(valid.sum())}
    hashed = np.zeros(n, dtype=bool) if hashed is None else hashed & valid

    if options.exact and digests is not None:
        rows = np.flatnonzero(hashed)
        for values, code, name in ((digests, _BYTES, "same_bytes"), (phashes, _PIXELS, "same_pixels")):
            if values is None:
                continue
            a, b = _equal_value_edges(values[rows], rows)
            forest.union(a, b)
            np.minimum.at(reason, np.concatenate([a, b]), code)
            stats[f"{name}_edges"] = int(len(a))
    stats["exact_seconds"] = round(time.perf_counter() - started, 3)

    clusters = 0
    near_pixels = options.exact and options.phash_bits > 0 and phashes is not None and hashed.any()
    if (options.semantic or near_pixels) and vectors is not None and valid.any():
        # the clusters are also where near-identical perceptual hashes are looked for
        source = RowSource(vectors)
        try:
            pairs = _PerPair(reason, nearest, nearest_cosine, phashes, hashed)
            clusters = _semantic(source, valid, forest, pairs, options, work_dir, stats)
        finally:
            source.close()

    t0 = time.perf_counter()
    group = forest.flatten()
    group = np.where(valid, group, -1)
    size = np.zeros(n, dtype=np.int32)
    counts = np.bincount(group[valid], minlength=n)
    size[valid] = counts[group[valid]]
    del counts
    keep = _keepers(group, size, valid, uid_halves, scores)
    in_group = valid & (size > 1)
    reason = np.where(in_group, np.minimum(reason, _SEMANTIC), -1).astype(np.int8)
    stats["group_seconds"] = round(time.perf_counter() - t0, 3)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return DedupResult(group, size, keep, reason, nearest, nearest_cosine, clusters, stats)


def _keepers(
    group: np.ndarray, size: np.ndarray, valid: np.ndarray, uid_halves: np.ndarray, scores: np.ndarray | None
) -> np.ndarray:
    """True for every pair without duplicates and for the best of each group."""
    keep = valid & (size <= 1)
    members = np.flatnonzero(valid & (size > 1))
    if not len(members):
        return keep
    halves = uid_halves[members]
    keys = [halves["f1"], halves["f0"]]  # last key sorts first in lexsort: the uid breaks ties
    if scores is not None:
        value = scores[members].astype(np.float64)
        keys.append(np.where(np.isnan(value), np.inf, -value))  # highest first, missing last
    keys.append(group[members])
    order = members[np.lexsort(keys)]
    first = np.ones(len(order), dtype=bool)
    first[1:] = group[order[1:]] != group[order[:-1]]
    keep[order[first]] = True
    return keep


@dataclass
class _PerPair:
    """What the search records per pair of the pool as it goes."""

    reason: np.ndarray
    nearest: np.ndarray
    nearest_cosine: np.ndarray
    phashes: np.ndarray | None
    hashed: np.ndarray


def _semantic(
    source: RowSource,
    valid: np.ndarray,
    forest: Forest,
    pairs: _PerPair,
    options: DedupOptions,
    work_dir: str | os.PathLike | None,
    stats: dict[str, Any],
) -> int:
    import tempfile

    t0 = time.perf_counter()
    rows_valid = np.flatnonzero(valid)
    k = default_clusters(len(rows_valid), options)
    rng = np.random.default_rng(options.seed)
    wanted = min(len(rows_valid), options.fit_rows, POINTS_PER_CENTROID * k)
    fit_rows = np.sort(rng.choice(rows_valid, size=wanted, replace=False))
    sample = source.take(fit_rows)
    sample /= np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)  # in place: it can be big
    clustering = Clustering(sample, k, options)
    del sample
    stats["fit_seconds"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    first = np.full(source.n, -1, dtype=np.int32)
    second = np.full(source.n, -1, dtype=np.int32)
    chunk_rows = max(1, (1 << 22) // max(1, source.d))
    for start, chunk in source.chunks(chunk_rows):
        ok = valid[start : start + len(chunk)]
        if ok.any():
            c1, c2 = clustering.assign(_normalise(chunk[ok]))
            first[start : start + len(chunk)][ok] = c1
            second[start : start + len(chunk)][ok] = c2
    stats["assign_seconds"] = round(time.perf_counter() - t0, 3)
    stats["spilled"] = int((second >= 0).sum())

    # every (cluster, row) membership, grouped by cluster
    spilled = np.flatnonzero(second >= 0)
    member_rows = np.concatenate([rows_valid, spilled])
    member_cluster = np.concatenate([first[rows_valid], second[spilled]])
    order = np.argsort(member_cluster, kind="stable")
    member_rows, member_cluster = member_rows[order], member_cluster[order]
    del order
    bounds = np.searchsorted(member_cluster, np.arange(clustering.k + 1))
    del member_cluster
    stats["largest_cluster"] = int(np.diff(bounds).max()) if len(bounds) > 1 else 0

    with tempfile.TemporaryDirectory(dir=work_dir, prefix="dedup-") as tmp:
        t0 = time.perf_counter()
        # big chunks, as stored: each chunk's rows land in at most one run per cluster
        rewrite_rows = max(chunk_rows, (1 << 26) // max(1, source.d * source.dtype.itemsize))
        sorted_rows = _rewrite_in_cluster_order(source, member_rows, Path(tmp) / "by_cluster.bin", rewrite_rows)
        stats["rewrite_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        edges = _EdgeBuffer(forest)
        for c in range(clustering.k):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            if hi - lo < 1:
                continue
            x = _normalise(sorted_rows.rows(lo, hi))
            _compare_cluster(x, member_rows[lo:hi], edges, pairs, options)
        edges.flush()
        sorted_rows.close()
        stats["compare_seconds"] = round(time.perf_counter() - t0, 3)
    stats["clusters"] = clustering.k
    stats["semantic_edges"] = edges.total
    return clustering.k


def _rewrite_in_cluster_order(source: RowSource, member_rows: np.ndarray, path: Path, chunk_rows: int) -> RowSource:
    """The rows of every membership, in membership order, as float16 in one file (one pass over the
    pool; each chunk's rows are sorted by destination and written as contiguous runs)."""
    d = source.d
    row_bytes = d * 2
    by_row = np.argsort(member_rows, kind="stable")  # memberships in source-row order
    rows_sorted = member_rows[by_row]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, len(member_rows) * row_bytes)
        for start, chunk in source.chunks(chunk_rows, dtype=None):
            lo, hi = np.searchsorted(rows_sorted, [start, start + len(chunk)])
            if lo == hi:
                continue
            dest = by_row[lo:hi]  # destinations of this chunk's memberships
            src = rows_sorted[lo:hi] - start
            order = np.argsort(dest, kind="stable")
            dest, src = dest[order], src[order]
            block = chunk[src].astype(np.float16, copy=False)
            breaks = np.flatnonzero(np.diff(dest) != 1) + 1
            for run_start, run_stop in zip(np.r_[0, breaks], np.r_[breaks, len(dest)]):
                os.pwrite(fd, block[run_start:run_stop].tobytes(), int(dest[run_start]) * row_bytes)
    finally:
        os.close(fd)
    return RowSource.raw(path, len(member_rows), d, np.float16)


class _EdgeBuffer:
    """Edges gathered across clusters, joined into the forest a million at a time."""

    def __init__(self, forest: Forest, limit: int = 1 << 20):
        self.forest, self.limit = forest, limit
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.pending = self.total = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if not len(a):
            return
        self.a.append(a)
        self.b.append(b)
        self.pending += len(a)
        self.total += len(a)
        if self.pending >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self.a:
            self.forest.union(np.concatenate(self.a), np.concatenate(self.b))
        self.a, self.b, self.pending = [], [], 0


def _compare_cluster(
    x: np.ndarray, rows: np.ndarray, edges: _EdgeBuffer, pairs: _PerPair, options: DedupOptions
) -> None:
    """Every pair of one cluster, in row blocks of bounded size: each row's nearest neighbour, and
    the duplicate edges (each pair once) reduced to a spanning forest."""
    m = len(x)
    if m < 2:
        return
    block = max(1, min(m, options.block_floats // m))
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    near_a: list[np.ndarray] = []
    near_b: list[np.ndarray] = []
    nearest, nearest_cosine = pairs.nearest, pairs.nearest_cosine
    use_phash = pairs.phashes is not None and options.exact and options.phash_bits > 0
    if use_phash:
        ph = pairs.phashes[rows]
        has_hash = pairs.hashed[rows]
    for start in range(0, m, block):
        stop = min(m, start + block)
        local = np.arange(start, stop)
        sims = x[start:stop] @ x.T
        sims[local - start, local] = -np.inf  # not its own neighbour
        at = np.argmax(sims, axis=1)
        value = sims[local - start, at]
        better = value > np.nan_to_num(nearest_cosine[rows[local]], nan=-np.inf)
        nearest[rows[local[better]]] = rows[at[better]]
        nearest_cosine[rows[local[better]]] = value[better]
        if options.semantic:
            hits = np.flatnonzero(value >= options.threshold)  # most rows have no duplicate at all
            if len(hits):
                i, j = np.nonzero(sims[hits] >= options.threshold)
                i = hits[i] + start
                upper = j > i
                found_a.append(i[upper])
                found_b.append(j[upper])
        if use_phash:
            dist = np.bitwise_count(np.bitwise_xor(ph[start:stop, None], ph[None, :]))
            i, j = np.nonzero((dist <= options.phash_bits) & has_hash[start:stop, None] & has_hash[None, :])
            i = i + start
            upper = j > i
            near_a.append(i[upper])
            near_b.append(j[upper])
    empty = np.zeros(0, dtype=np.int64)
    a, b = np.concatenate(found_a or [empty]), np.concatenate(found_b or [empty])
    if use_phash:
        pa_, pb_ = np.concatenate(near_a or [empty]), np.concatenate(near_b or [empty])
        np.minimum.at(pairs.reason, rows[np.concatenate([pa_, pb_])], _NEAR)
        a, b = np.concatenate([a, pa_]), np.concatenate([b, pb_])
    if not len(a):
        return
    # a spanning forest of the cluster's duplicate graph: at most m - 1 edges leave the cluster
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(m, m))
    _, labels = connected_components(graph, directed=False)
    lead = np.full(labels.max() + 1, m, dtype=np.int64)
    np.minimum.at(lead, labels, np.arange(m))
    involved = np.unique(np.concatenate([a, b]))
    follower = involved[lead[labels[involved]] != involved]
    edges.add(rows[lead[labels[follower]]], rows[follower])
