"""ShardSource -> Iterator[Sample] for WebDataset tars, parquet files and image folders.

Readers never raise for one bad sample or a damaged shard: every problem becomes a Sample with
``error`` set (codes in :mod:`mlmfilter.core.errors`), so every pair is counted. Image bytes are
passed through undecoded (decoding belongs to :mod:`mlmfilter.images.decode`).

Layouts
- tar (:mod:`.tar`): img2dataset / DataComp WebDataset shards, members ``KEY.jpg|jpeg|png|webp``,
  ``KEY.txt``, ``KEY.json``. The key is the member path up to the first dot of its basename
  (directory prefix kept, as in webdataset). The tar is streamed, never held in memory.
- parquet (:mod:`.parquet`): one row per pair; an image bytes column (``jpg``/``image``/``image_bytes``...,
  plain binary or HF-datasets ``{bytes, path}`` struct) or an image path column (relative to the
  parquet's folder), a caption column, optional ``uid`` and ``key`` columns.
- folder (:mod:`.folder`): images plus ``captions.jsonl`` / ``captions.csv`` / ``captions.tsv`` (an
  image-file field and a caption field per row; several rows per image give keys ``stem#0``,
  ``stem#1``...), or, with no captions file, WebDataset-style sidecars (``KEY.jpg`` beside
  ``KEY.txt``/``KEY.json``).

Safety (:mod:`.files`): nothing is read that the user did not name. One member, image file or
image value may cost at most ``max_member_bytes`` (checked before reading: ``member_too_large``);
FIFOs and devices are never opened (``not_a_regular_file``); tar members with absolute or ``..``
names and link/device/FIFO members are ``unsafe_member`` rows; image paths leading outside the
dataset's folder, and URLs, are ``unsafe_path`` rows unless ``allow_absolute_paths`` is set.
"""

from __future__ import annotations

from typing import Iterator

from mlmfilter.core.sample import Sample
from mlmfilter.io.readers.folder import read_folder
from mlmfilter.io.readers.options import ReadOptions
from mlmfilter.io.readers.parquet import read_parquet
from mlmfilter.io.readers.samples import TRUNCATED_KEY_PREFIX, sniff_image_format, split_member_name
from mlmfilter.io.readers.tar import read_tar
from mlmfilter.io.sources import ShardSource

__all__ = ["ReadOptions", "TRUNCATED_KEY_PREFIX", "read_shard", "sniff_image_format", "split_member_name"]


def read_shard(source: ShardSource, options: ReadOptions | None = None) -> Iterator[Sample]:
    """Every pair of ``source`` as a Sample, in shard order. Never raises for bad input."""
    options = options or ReadOptions()
    readers = {"tar": read_tar, "parquet": read_parquet, "folder": read_folder}
    return readers[source.format](source, options)
