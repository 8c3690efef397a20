"""``mlmfilter dedup RUN``: the duplicate groups of a run, written as a stage that select reads.

The run's kept embeddings and image hashes (:mod:`mlmfilter.runs.embeddings`) go through
:func:`mlmfilter.selection.dedup.find_duplicates`; the answer is one table per shard in
``RUN/dedup/`` (the run layer's markers and atomic writes), one row per pair:

| column | what |
|---|---|
| ``dup_group`` | the group's id (the row number of its first pair in the pool); null for a pair without duplicates |
| ``dup_size`` | pairs in its group (1: none) |
| ``dup_keep`` | true for the pair kept of each group and for every pair without duplicates; null when the pair has no embedding |
| ``dup_reason`` | ``same_bytes``, ``same_pixels``, ``near_pixels`` or ``semantic``: the strongest tie to its group |
| ``dup_nearest_uid``, ``dup_nearest_cosine`` | the most similar other pair of its cluster, a duplicate or not (how far the threshold is) |

``mlmfilter select RUN --where 'dup_keep and itm >= 60'`` joins this stage to the score stage on uid.
Deduplication decides over the whole pool, so it is computed again on every call (the same settings
give the same table); other settings than the stage's replace it only with ``overwrite``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mlmfilter.images.phash import hex_to_uint64
from mlmfilter.io.npy import NpyAppender
from mlmfilter.io.uid import empty_halves, halves_to_uids, uids_to_halves
from mlmfilter.runs.embeddings import IMAGE_DIGEST, IMAGE_PHASH, NoEmbeddings, RunEmbeddings, aligned_values
from mlmfilter.runs.folder import ConfigMismatch, RunFolder
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import write_tables
from mlmfilter.runs.stage import identity_schema
from mlmfilter.selection.dedup import REASONS, DedupOptions, DedupResult, find_duplicates

log = logging.getLogger(__name__)

DEDUP_STAGE = "dedup"
DEDUP_COLUMNS = [
    pa.field("dup_group", pa.int64()),
    pa.field("dup_size", pa.int32()),
    pa.field("dup_keep", pa.bool_()),
    pa.field("dup_reason", pa.string()),
    pa.field("dup_nearest_uid", pa.string()),
    pa.field("dup_nearest_cosine", pa.float32()),
]
DEDUP_SCHEMA = identity_schema(DEDUP_COLUMNS)
NO_EMBEDDING = "no_embedding"


@dataclass
class DedupSummary:
    run_dir: str
    stage: str
    pairs: int
    compared: int  # pairs with an embedding (and hashes) that took part
    groups: int  # groups of two or more pairs
    removed: int  # pairs not kept
    by_reason: dict[str, int]  # removed pairs by the strongest tie to their group
    largest: list[dict[str, Any]]  # the largest groups: size, kept uid, reason
    settings: dict[str, Any]
    stats: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "stage": self.stage,
            "pairs": self.pairs,
            "compared": self.compared,
            "groups": self.groups,
            "removed": self.removed,
            "kept": self.compared - self.removed,
            "by_reason": self.by_reason,
            "largest": self.largest,
            "settings": self.settings,
            "stats": self.stats,
            "warnings": self.warnings,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


def dedup_run(
    run: str | Path,
    options: DedupOptions | None = None,
    *,
    on: str | None = None,
    embeddings_stage: str | None = None,
    keep_best: str | None = None,
    stage: str = DEDUP_STAGE,
    allow_incomplete: bool = False,
    overwrite: bool = False,
    work_dir: str | Path | None = None,
    semantic: bool | None = None,
) -> DedupSummary:
    """Find the run's duplicate groups and write them as the stage ``stage``.

    ``semantic``: SemDeDup over the embeddings (None: yes, unless they come from random stand-in
    weights); it overrides ``options.semantic``.

    ``on``: ``image`` (default when the run keeps image embeddings) or ``text`` embeddings.
    ``keep_best``: a column of any stage of the run (``itm``, ``clip_score``): the pair with its
    highest value is kept of each group; else the first by uid.
    """
    started = time.perf_counter()
    options = options or DedupOptions()
    reader = RunReader(run)
    if on not in (None, "image", "text"):
        raise ValueError(f"--on takes image or text, got {on!r}")
    if on is None:  # duplicates are the same picture, unless the run keeps caption embeddings only
        # (a run without any embeddings is refused here, with how to make them)
        named = RunEmbeddings(reader, embeddings_stage)
        has_image = named.has("image") or (not embeddings_stage and bool(RunEmbeddings.stages_with(reader, "image")))
        on = "image" if has_image else "text"
    modality = on
    embeddings = RunEmbeddings(reader, embeddings_stage, modality=modality)
    if stage == embeddings.stage:
        raise ValueError(f"the dedup stage needs a name of its own (the embeddings are in stage {stage!r})")
    done = embeddings.completeness()
    if not done.complete and not allow_incomplete:
        raise ValueError(
            f"stage {embeddings.stage!r} of {reader.url} is incomplete ({done.done} of {done.total} shards): "
            "finish it (re-run the same command, it resumes) or pass --allow-incomplete"
        )
    notes: list[str] = []
    if semantic is None:  # by default, unless the vectors are random stand-ins (their groups would be noise)
        semantic = not embeddings.warnings()
        if not semantic:
            notes.append(
                f"the {embeddings.stage!r} embeddings come from random stand-in weights: semantic dedup skipped, "
                "exact duplicates only (pass --semantic to group by them anyway)"
            )
    options = options.model_copy(update={"semantic": semantic})
    keep_stage = _stage_with(reader, keep_best, exclude=stage) if keep_best else None
    # the image hashes say which pictures are the same: they join groups of images, not of captions
    hashes = embeddings.has_hashes() and modality == "image"
    settings = {
        "kind": "dedup",
        "on": modality,
        "embeddings": embeddings.describe(),
        "keep_best": {"column": keep_best, "stage": keep_stage} if keep_best else None,
        "options": options.model_dump(mode="json"),
        "hashes": hashes,
    }
    folder = RunFolder(reader.url)
    _check_settings(folder, stage, settings, overwrite)

    with tempfile.TemporaryDirectory(dir=work_dir, prefix="mlmfilter-dedup-") as tmp:
        pool = _read_pool(reader, embeddings, modality, keep_best, keep_stage, Path(tmp))
        result = find_duplicates(
            pool.vectors_path,
            pool.valid,
            uid_halves=pool.halves,
            digests=pool.digests if hashes else None,
            phashes=pool.phashes if hashes else None,
            hashed=pool.hashed if hashes else None,
            scores=pool.scores,
            options=options,
            work_dir=tmp,
        )
    tables = _tables(embeddings, pool, result)
    warnings = embeddings.warnings()
    summary = _summary(reader.url, stage, pool, result, settings, warnings)
    summary.notes = notes
    summary.seconds = time.perf_counter() - started
    if overwrite:
        folder.stage(stage).clear()
    write_tables(
        folder,
        stage,
        tables,
        identity=settings,
        provenance={"kind": "dedup", "settings": settings, "summary": summary.to_json(), "warnings": warnings},
    )
    return summary


def _check_settings(folder: RunFolder, stage: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Other settings than the stage's are refused before any work, unless ``overwrite``."""
    from mlmfilter.core.ids import fingerprint_of

    previous = folder.stage(stage).read_settings()
    if overwrite or previous is None or previous.get("fingerprint") == fingerprint_of(settings):
        return
    raise ConfigMismatch(
        f"stage {stage!r} of {folder.url} was made with other dedup settings; pass --overwrite to replace it, "
        "or --stage NAME to keep both"
    )


def _stage_with(reader: RunReader, column: str, exclude: str) -> str:
    """The first stage of the run whose tables have ``column``."""
    stages = reader.columns_by_stage((exclude,))
    for name, columns in stages.items():
        if column in columns:
            return name
    known = list(dict.fromkeys(c for columns in stages.values() for c in columns))
    raise ValueError(f"--keep-best {column!r}: no stage of {reader.url} has that column (columns: {', '.join(known)})")


@dataclass
class _Pool:
    vectors_path: Path
    valid: np.ndarray
    halves: np.ndarray
    digests: np.ndarray
    phashes: np.ndarray
    hashed: np.ndarray
    scores: np.ndarray | None
    shards: list[tuple[str, int]]  # (shard id, rows) in pool order


def _read_pool(
    reader: RunReader,
    embeddings: RunEmbeddings,
    modality: str,
    keep_best: str | None,
    keep_stage: str | None,
    tmp: Path,
) -> _Pool:
    """Every completed shard's vectors appended to one .npy; per row its uid, hashes and keep value."""
    columns = ["uid", "key", "error"] + ([IMAGE_DIGEST, IMAGE_PHASH] if embeddings.has_hashes() else [])
    store = NpyAppender(tmp / "vectors.npy", "float16")
    valid, halves, digests, phashes, hashed, scores, shards = [], [], [], [], [], [], []
    for shard_id, block in embeddings.blocks([modality], columns):
        table = block.table
        store.append(block.vectors[modality])
        ok = block.valid & table.column("error").is_null().to_numpy(zero_copy_only=False)
        valid.append(ok)
        halves.append(uids_to_halves(table.column("uid")))
        if IMAGE_DIGEST in table.column_names:
            digest_text = table.column(IMAGE_DIGEST).to_pylist()
            phash_text = table.column(IMAGE_PHASH).to_pylist()
            digests.append(hex_to_uint64(digest_text))
            phashes.append(hex_to_uint64(phash_text))
            hashed.append(np.array([bool(d) and bool(p) for d, p in zip(digest_text, phash_text)], dtype=bool))
        if keep_best:
            scores.append(aligned_values(reader, shard_id, keep_stage, keep_best, table.column("key")))
        shards.append((shard_id, table.num_rows))
    store.close(row_shape=(embeddings.dim(modality),))

    def joined(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    n = sum(rows for _, rows in shards)
    return _Pool(
        vectors_path=tmp / "vectors.npy",
        valid=joined(valid, bool),
        halves=np.concatenate(halves) if halves else empty_halves(),
        digests=joined(digests, np.uint64) if digests else np.zeros(n, np.uint64),
        phashes=joined(phashes, np.uint64) if phashes else np.zeros(n, np.uint64),
        hashed=joined(hashed, bool) if hashed else np.zeros(n, bool),
        scores=joined(scores, np.float64) if keep_best else None,
        shards=shards,
    )


def _tables(embeddings: RunEmbeddings, pool: _Pool, result: DedupResult) -> dict[str, pa.Table]:
    out: dict[str, pa.Table] = {}
    start = 0
    uids_of_nearest = np.where(result.nearest >= 0, result.nearest, 0)
    for shard_id, rows in pool.shards:
        stop = start + rows
        base = embeddings.run.table(
            shard_id, embeddings.stage, columns=["uid", "shard", "key", "error", "error_detail"]
        )
        ok = pool.valid[start:stop]
        group = result.group[start:stop]
        size = result.size[start:stop]
        in_group = ok & (size > 1)
        nearest = result.nearest[start:stop]
        has_nearest = ok & (nearest >= 0)
        nearest_uids = np.array(halves_to_uids(pool.halves[uids_of_nearest[start:stop]]), dtype=object)
        reason = result.reason[start:stop]
        error = base.column("error").to_pylist()
        detail = base.column("error_detail").to_pylist()
        for i in np.flatnonzero(~ok):
            if error[i] is None:  # an embedding row without vector or hashes: say why it takes no part
                error[i], detail[i] = NO_EMBEDDING, f"no {embeddings.stage} embedding for this pair"
        columns = {
            "uid": base.column("uid"),
            "shard": base.column("shard"),
            "key": base.column("key"),
            "dup_group": pa.array(group, mask=~in_group, type=pa.int64()),
            "dup_size": pa.array(size, mask=~ok, type=pa.int32()),
            "dup_keep": pa.array(result.keep[start:stop], mask=~ok, type=pa.bool_()),
            "dup_reason": pa.array(
                [REASONS[r] if r >= 0 else None for r in reason.tolist()], mask=~in_group, type=pa.string()
            ),
            "dup_nearest_uid": pa.array(nearest_uids, mask=~has_nearest, type=pa.string()),
            "dup_nearest_cosine": pa.array(result.nearest_cosine[start:stop], mask=~has_nearest, type=pa.float32()),
            "error": pa.array(error, type=pa.string()),
            "error_detail": pa.array(detail, type=pa.string()),
        }
        out[shard_id] = pa.table(columns, schema=DEDUP_SCHEMA)
        start = stop
    return out


def _summary(
    run_url: str, stage: str, pool: _Pool, result: DedupResult, settings: dict, warnings: list[str]
) -> DedupSummary:
    removed = (result.group >= 0) & ~result.keep & pool.valid
    by_reason = {REASONS[code]: int(((result.reason == code) & removed).sum()) for code in range(len(REASONS))}
    leads = np.flatnonzero(result.keep & (result.size > 1) & pool.valid)
    largest = []
    for row in leads[np.argsort(-result.size[leads], kind="stable")][:5]:
        members = int(result.size[row])
        largest.append(
            {
                "group": int(result.group[row]),
                "size": members,
                "kept_uid": halves_to_uids(pool.halves[row : row + 1])[0],
                "reason": REASONS[result.reason[row]] if result.reason[row] >= 0 else None,
            }
        )
    return DedupSummary(
        run_dir=run_url,
        stage=stage,
        pairs=len(pool.valid),
        compared=int(pool.valid.sum()),
        groups=result.groups(),
        removed=int(removed.sum()),
        by_reason={k: v for k, v in by_reason.items() if v},
        largest=largest,
        settings=settings,
        stats=result.stats,
        warnings=warnings,
    )


__all__ = ["DEDUP_STAGE", "DedupOptions", "DedupSummary", "NoEmbeddings", "dedup_run"]
