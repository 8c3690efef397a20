"""gzip-compressed shards, decompressed with their integrity checked.

tarfile's stream mode (``r|gz``) inflates a ``.tar.gz`` without ever checking the gzip trailer, so a
flipped byte inside a stored (incompressible: JPEG) block, or a bad CRC-32, is read as healthy data
and its corrupted image is scored. Here zlib inflates each gzip member with the trailer check on
(``wbits=31``): a member's CRC-32 and length are compared at its end, and damaged deflate data fails
where it is met.

A gzip member has one checksum, over all of its data, checked only at its end: a member that fails
it has no byte that can be trusted. So a shard that can be read twice (a file, a URL) is checked
first, end to end (:func:`find_damage`); the read that follows marks every pair whose data reaches
into the damaged member, and nothing before it. A ``pipe:`` shard can be read only once: its check
comes at its end, after its pairs were read (the reader then reports the damage as one more row).

A stream cut short (an interrupted download) is not damage: its bytes so far are what the sender
wrote, and the tar reader reports the missing end as it does for an uncompressed tar.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable, ContextManager

GZIP_MAGIC = b"\x1f\x8b"
#: compressed bytes read, and decompressed bytes produced, per step (decompression is bounded by it)
CHUNK = 1 << 20


@dataclass(frozen=True)
class StreamDamage:
    """Where a compressed stream stops being trustworthy: its decompressed ``offset``, and why."""

    offset: int
    detail: str


class GzipDamaged(Exception):
    """A gzip member failed its check; ``damage`` says from which decompressed byte on nothing holds."""

    def __init__(self, damage: StreamDamage):
        super().__init__(damage.detail)
        self.damage = damage


class Prefixed:
    """A read stream with bytes already taken from its head (to sniff the format) put back in front."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head = head
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        if len(data) < size:
            data += self._stream.read(size - len(data))
        return data


def sniff(stream: IO[bytes]) -> tuple[bool, Prefixed]:
    """(whether ``stream`` is gzip data, the same stream from its first byte)."""
    head = stream.read(2)
    return head == GZIP_MAGIC, Prefixed(head, stream)


class CheckedGzip:
    """The decompressed bytes of a gzip stream of one or more members, each checked (see the module doc).

    zlib inflates the raw deflate data and the header and trailer are read here, so every byte of a
    member is handed out before its trailer is compared: with ``strict``, ``read`` then raises
    :class:`GzipDamaged`; without, the damage is kept in :attr:`damage` and the next member follows
    (corrupt deflate data ends the stream there). Zero bytes after the last member (padding) end the
    stream, as gzip(1) allows."""

    def __init__(self, stream: IO[bytes], what: str, strict: bool = True):
        self._stream = stream
        self._what = what
        self._strict = strict
        self._input = b""  # compressed bytes read but not used yet
        self._inflate: Any = None  # the current member's decompressor; None between members
        self._crc = 0
        self._length = 0
        self._buffer = bytearray()
        self._ended = False
        self.produced = 0  # decompressed bytes so far
        self.member_start = 0  # where the current member's data starts, decompressed
        self.damage: StreamDamage | None = None

    def read(self, size: int = -1) -> bytes:
        want = CHUNK if size is None or size < 0 else size
        while len(self._buffer) < want and not self._ended:
            self._step()
        if size is None or size < 0:
            while not self._ended:
                self._step()
            want = len(self._buffer)
        data = bytes(self._buffer[:want])
        del self._buffer[:want]
        return data

    # -- one step: a header, a piece of a member's data, or its trailer -------------------------------
    def _step(self) -> None:
        if self._inflate is None:
            self._start_member()
        elif not self._inflate.eof:
            self._inflate_some()
        else:
            self._check_trailer()

    def _more(self, n: int) -> bool:
        """At least ``n`` unused compressed bytes at hand (False: the input ends first)."""
        while len(self._input) < n:
            data = self._stream.read(max(CHUNK, n - len(self._input)))
            if not data:
                return False
            self._input += data
        return True

    def _start_member(self) -> None:
        if not self._more(1):
            self._ended = True
            return
        if not self._input.strip(b"\0") and self._only_padding():
            self._ended = True
            return
        header = self._header_length()
        if header is None:  # cut short inside a header: the tar layer reports the missing end
            self._ended = True
            return
        self._input = self._input[header:]
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._crc, self._length = 0, 0
        self.member_start = self.produced

    def _only_padding(self) -> bool:
        """Whether nothing but zero bytes is left (gzip(1) allows such padding after the last member)."""
        while not self._input.strip(b"\0"):
            data = self._stream.read(CHUNK)
            if not data:
                return True
            self._input = data
        self._input = self._input.lstrip(b"\0")
        return False

    def _header_length(self) -> int | None:
        """The length of the gzip header at the head of the input; None when the input ends inside it."""
        if not self._more(10):
            return None
        head = self._input
        if head[:2] != GZIP_MAGIC or head[2] != 8:
            self._fail(f"what follows byte {self.produced} of its data is not a gzip member", fatal=True)
            return None
        flags, at = head[3], 10
        if flags & 4:  # FEXTRA: a length, then that many bytes
            if not self._more(at + 2):
                return None
            at += 2 + int.from_bytes(self._input[at : at + 2], "little")
        for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
            if flags & flag:
                while (end := self._input.find(b"\0", at)) < 0:
                    if not self._more(len(self._input) + 1):
                        return None
                at = end + 1
        if flags & 2:  # FHCRC
            at += 2
        return at if self._more(at) else None

    def _inflate_some(self) -> None:
        last = not self._input and not self._more(1)  # the input ends: what zlib still holds, then stop
        try:
            out = self._inflate.flush() if last else self._inflate.decompress(self._input, CHUNK)
        except zlib.error as exc:
            self._fail(f"its compressed data is corrupt ({exc})", fatal=True)
            return
        self._input = self._inflate.unconsumed_tail or self._inflate.unused_data
        self._crc = zlib.crc32(out, self._crc)
        self._length += len(out)
        self._buffer += out
        self.produced += len(out)
        if last and not self._inflate.eof:
            self._ended = True  # cut short: the tar layer reports the missing end

    def _check_trailer(self) -> None:
        if not self._more(8):
            self._ended = True  # cut short inside the trailer
            return
        crc = int.from_bytes(self._input[:4], "little")
        length = int.from_bytes(self._input[4:8], "little")
        self._input = self._input[8:]
        self._inflate = None
        if crc != self._crc:
            self._fail("its CRC-32 does not match its data")
        elif length != self._length & 0xFFFFFFFF:
            self._fail("its length does not match its trailer")

    def _fail(self, why: str, fatal: bool = False) -> None:
        damage = StreamDamage(
            self.member_start,
            f"{self._what}: the gzip member holding decompressed bytes from {self.member_start} on is damaged: "
            f"{why}; none of its data is trusted",
        )
        self.damage = self.damage or damage
        if fatal:  # nothing after it can be read
            self._ended = True
            self._inflate = None
        if self._strict:
            raise GzipDamaged(damage)


def find_damage(open_stream: Callable[[], ContextManager[IO[bytes]]], what: str) -> StreamDamage | None:
    """Read a gzip stream end to end (``open_stream()`` opens it afresh); where it is damaged, or None."""
    with open_stream() as raw:
        checked = CheckedGzip(raw, what)
        try:
            while checked.read(CHUNK):
                pass
        except GzipDamaged as exc:
            return exc.damage
    return None


def drain(stream: CheckedGzip) -> StreamDamage | None:
    """Read what is left of a checked stream (a trailer is checked only when reached); the damage, or None."""
    try:
        while stream.read(CHUNK):
            pass
    except GzipDamaged as exc:
        return exc.damage
    return stream.damage
