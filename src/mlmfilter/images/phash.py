"""Fingerprints of an image for exact-duplicate detection: its bytes, and its pixels after re-encoding.

- :func:`bytes_digest`: 64 bits of BLAKE2b over the encoded file: the same file, byte for byte.
- :func:`phash`: the DCT perceptual hash (Zauner 2010; the ``imagehash.phash`` recipe): greyscale,
  32 x 32 (Lanczos), 2-D DCT-II, the 8 x 8 lowest frequencies, each bit "above their median". A
  JPEG re-encoded at another quality, or the same photo resized, keeps the hash or moves a few of
  its 64 bits; distinct photos differ in about half of them. :func:`hamming` counts the bits.

Both are 16 lowercase hex characters (a string column reads plainly in tables and reports, and
sorts like the number). Written in numpy: the DCT is one 32 x 32 matrix, no scipy needed.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from PIL import Image

#: side of the greyscale thumbnail the DCT runs on, and of the low-frequency block kept
PHASH_SIDE, PHASH_BITS_SIDE = 32, 8


def bytes_digest(data: bytes) -> str:
    """64 bits of BLAKE2b of the encoded bytes, as 16 hex characters."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@functools.lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` is the DCT of a column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def phash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash of ``image`` as 16 hex characters (bit 63 first)."""
    grey = image.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    dct = _dct_matrix(PHASH_SIDE)
    low = (dct @ pixels @ dct.T)[:PHASH_BITS_SIDE, :PHASH_BITS_SIDE]
    bits = (low > np.median(low)).ravel()
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return f"{value:016x}"


def hex_to_uint64(values) -> np.ndarray:
    """16-hex-character hashes (None for a missing one) as uint64; a missing hash is 0 and False in ``valid``."""
    out = np.zeros(len(values), dtype=np.uint64)
    for i, text in enumerate(values):
        if text:
            out[i] = int(text, 16)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes (broadcasting, e.g. a column against a row)."""
    return np.bitwise_count(np.bitwise_xor(a, b))
