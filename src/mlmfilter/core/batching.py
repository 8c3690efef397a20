"""Items in lists of a fixed size: scorers' chunks, reshard's write batches."""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items in order, the last one shorter; items are pulled one batch at a time.

    ``itertools.batched`` from Python 3.12 on, but lists (callers fill and reuse them) and for 3.10.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
