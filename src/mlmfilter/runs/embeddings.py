"""Embeddings kept in a run: the column contract and the one reader.

A stage that keeps embeddings (``mlmfilter embed``, or ``score --scorer clip`` with
``embeddings: true``) writes, per pair, in its ordinary table:

- ``image_embedding`` / ``text_embedding``: fixed-size lists of float16, L2-normalised (a pair
  without one, e.g. an errored pair, has null). Each field carries, in its arrow metadata under
  ``mlmfilter.embedding``, the model that made it, its dimension, the normalisation and whether the
  weights were random stand-ins; the stage's provenance records the same.
- ``image_digest`` (BLAKE2b-64 of the encoded bytes) and ``image_phash`` (64-bit DCT perceptual
  hash), 16 hex characters each: what exact deduplication compares.

The tables stay the run layer's (atomic writes, markers, resume): no file beside them to keep in
step. :class:`RunEmbeddings` is how everything else reads them (dedup, distillation, ``teach
sample`` over a run, the report), one completed shard at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from mlmfilter.runs.read import RunReader

IMAGE_EMBEDDING, TEXT_EMBEDDING = "image_embedding", "text_embedding"
IMAGE_DIGEST, IMAGE_PHASH = "image_digest", "image_phash"
#: modality -> its column
EMBEDDING_COLUMNS = {"image": IMAGE_EMBEDDING, "text": TEXT_EMBEDDING}
METADATA_KEY = b"mlmfilter.embedding"
NORMALIZATION = "l2"
STORED_DTYPE = "float16"
#: the stage named this is preferred when several stages of a run keep embeddings
PREFERRED_STAGE = "embed"


def embedding_field(modality: str, dim: int, info: dict[str, Any]) -> pa.Field:
    """The column of one modality's embeddings, with what made them in its metadata."""
    meta = {"modality": modality, "dim": dim, "normalization": NORMALIZATION, "dtype": STORED_DTYPE, **info}
    return pa.field(
        EMBEDDING_COLUMNS[modality],
        pa.list_(pa.float16(), dim),
        metadata={METADATA_KEY: json.dumps(meta, sort_keys=True, default=str).encode()},
    )


def hash_fields() -> list[pa.Field]:
    return [pa.field(IMAGE_DIGEST, pa.string()), pa.field(IMAGE_PHASH, pa.string())]


class NoEmbeddings(ValueError):
    """The run keeps no embeddings (of the wanted kind): the message says how to make them."""


@dataclass
class EmbeddingBlock:
    """Rows of one shard (or part of one): their table columns and, per modality, an (n, d) float16
    array. Rows without an embedding hold zeros there and False in ``valid``."""

    table: pa.Table
    vectors: dict[str, np.ndarray]
    valid: np.ndarray  # True where every requested modality has an embedding

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def vectors_of(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list column as an (n, dim) float16 array (zeros where null) and its validity."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    valid = array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else np.ones(n, dtype=bool)
    out = np.zeros((n, dim), dtype=np.float16)
    if valid.any():
        values = array.flatten()  # the values of the non-null lists, in order
        out[valid] = values.to_numpy(zero_copy_only=False).astype(np.float16, copy=False).reshape(-1, dim)
    return out, valid


class RunEmbeddings:
    """The embeddings one stage of a run keeps.

    ``stage`` names it; without a name, the stage whose table has embedding columns (of
    ``modality`` when given); when several do, one made with real weights before one made with
    random stand-ins, then the one named ``embed``.
    """

    def __init__(self, run: str | RunReader, stage: str | None = None, modality: str | None = None):
        self.run = run if isinstance(run, RunReader) else RunReader(run)
        self.stage = stage or self._find_stage(modality)
        try:
            schema = self.run.schema(self.stage)
        except ValueError as exc:
            raise NoEmbeddings(str(exc)) from None
        self.fields = {m: schema.field(c) for m, c in EMBEDDING_COLUMNS.items() if c in schema.names}
        if not self.fields:
            raise NoEmbeddings(f"stage {self.stage!r} of {self.run.url} keeps no embeddings; {_HOW_TO_EMBED}")
        if modality is not None and modality not in self.fields:
            raise NoEmbeddings(
                f"stage {self.stage!r} of {self.run.url} keeps no {modality} embeddings "
                f"(it has: {', '.join(self.fields)}); {_HOW_TO_EMBED}"
            )
        self.schema = schema

    @staticmethod
    def stages_with(run: RunReader, modality: str | None = None) -> list[str]:
        """The stages of ``run`` whose tables keep embeddings (of ``modality`` when given)."""
        wanted = [EMBEDDING_COLUMNS[modality]] if modality else list(EMBEDDING_COLUMNS.values())
        return [stage for stage, names in run.columns_by_stage().items() if any(n in names for n in wanted)]

    def _find_stage(self, modality: str | None) -> str:
        found = self.stages_with(self.run, modality)
        if not found:
            what = f"{modality} embeddings" if modality else "embeddings"
            raise NoEmbeddings(f"{self.run.url} keeps no {what}; {_HOW_TO_EMBED}")
        # real weights before random stand-ins, then the stage named `embed`, then the run's order
        return min(found, key=lambda s: (bool(self.run.provenance(s).get("warnings")), s != PREFERRED_STAGE))

    # -- what they are ----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.fields)

    def has(self, modality: str) -> bool:
        return modality in self.fields

    def dim(self, modality: str) -> int:
        return self.fields[modality].type.list_size

    def info(self, modality: str) -> dict[str, Any]:
        """What made this modality's embeddings (model, dim, normalisation, random weights ...)."""
        meta = self.fields[modality].metadata or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {"modality": modality}

    def describe(self) -> dict[str, Any]:
        """Provenance for whatever is made from these embeddings."""
        return {"run": self.run.url, "stage": self.stage, **{m: self.info(m) for m in self.fields}}

    def warnings(self) -> list[str]:
        """The stage's warnings (random stand-in weights: every vector it made means nothing)."""
        return list(self.run.provenance(self.stage).get("warnings", []))

    def completeness(self):
        return self.run.completeness(self.stage)

    def has_hashes(self) -> bool:
        return IMAGE_DIGEST in self.schema.names and IMAGE_PHASH in self.schema.names

    # -- reading ----------------------------------------------------------------------------------
    def _modalities(self, modalities: Sequence[str] | None) -> list[str]:
        wanted = list(modalities) if modalities is not None else self.modalities
        missing = [m for m in wanted if m not in self.fields]
        if missing:
            raise NoEmbeddings(f"stage {self.stage!r} of {self.run.url} keeps no {missing[0]} embeddings")
        return wanted

    def shard(
        self, shard_id: str, modalities: Sequence[str] | None = None, columns: Sequence[str] = ("uid", "key")
    ) -> EmbeddingBlock | None:
        """One completed shard's rows, in table order; None when the stage has not finished the shard."""
        wanted = self._modalities(modalities)
        names = [c for c in columns if c in self.schema.names]
        table = self.run.table(shard_id, self.stage, columns=names + [EMBEDDING_COLUMNS[m] for m in wanted])
        if table is None:
            return None
        return self._block(table, names, wanted)

    def blocks(
        self, modalities: Sequence[str] | None = None, columns: Sequence[str] = ("uid", "key")
    ) -> Iterator[tuple[str, EmbeddingBlock]]:
        """(shard id, block) for every completed shard, in shard-id order."""
        wanted = self._modalities(modalities)
        for shard_id in self.run.folder.stage(self.stage).done_shards():
            block = self.shard(shard_id, wanted, columns)
            if block is not None:
                yield shard_id, block

    def _block(self, table: pa.Table, names: list[str], wanted: list[str]) -> EmbeddingBlock:
        vectors, valid = {}, np.ones(table.num_rows, dtype=bool)
        for modality in wanted:
            vectors[modality], ok = vectors_of(table.column(EMBEDDING_COLUMNS[modality]), self.dim(modality))
            valid &= ok
        return EmbeddingBlock(table.select(names), vectors, valid)


def aligned_values(
    run: RunReader, shard_id: str, stage: str, column: str, keys: pa.Array | pa.ChunkedArray
) -> np.ndarray:
    """``column`` of another stage of the run for the rows of this shard with ``keys`` (a stage's rows
    of one shard are matched by key): float64, NaN where that stage has no value."""
    import pyarrow.compute as pc

    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    out = np.full(len(keys), np.nan)
    table = run.table(shard_id, stage, columns=["key", column])
    if table is None:
        return out
    where = pc.index_in(keys, value_set=table.column("key").combine_chunks())
    found = where.is_valid().to_numpy(zero_copy_only=False)
    values = table.column(column).take(where.filter(where.is_valid())).cast(pa.float64()).fill_null(np.nan)
    out[found] = values.to_numpy(zero_copy_only=False)
    return out


_HOW_TO_EMBED = (
    "make them with `mlmfilter embed RUN` (CLIP image + text; --text-only for MiniLM caption embeddings), "
    "or score with `--scorer clip --option clip.embeddings=true`"
)
