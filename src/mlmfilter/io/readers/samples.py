"""The raw parts of one pair -> a Sample, with the first problem found as its error."""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.io.readers.options import ReadOptions
from mlmfilter.io.sources import ShardSource
from mlmfilter.io.uid import derive_uid, normalize_uid

TRUNCATED_KEY_PREFIX = "__truncated__@"


class SampleProblem(Exception):
    """Why one sample's part was not read; ``reason`` is an :mod:`mlmfilter.core.errors` code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SampleBuilder:
    """Turns the raw parts of one pair into a Sample, flagging the first problem found."""

    def __init__(self, source: ShardSource, options: ReadOptions):
        self.source = source
        self.shard_name = source.uid_name  # the file name (with its id where another shard has that name)
        self.options = options

    def uid_for(self, key: str, candidate: Any = None) -> str:
        return normalize_uid(candidate) or derive_uid(self.shard_name, key)

    def broken(self, key: str, reason: str, detail: str) -> Sample:
        """A row standing for pairs that could not be read at all."""
        return Sample(uid=self.uid_for(key), shard=self.source.id, key=key).fail(reason, detail)

    def build(
        self,
        key: str,
        *,
        image_bytes: bytes | None,
        image_format: str | None,
        caption: bytes | str | None,
        meta: Mapping[str, Any] | None = None,
        uid: Any = None,
        missing_image_detail: str = "",
        metadata_error: str | None = None,
        problem: SampleProblem | None = None,
    ) -> Sample:
        meta = dict(meta or {})
        sample = Sample(
            uid=self.uid_for(key, uid if uid is not None else meta.get("uid")),
            shard=self.source.id,
            key=key,
            image_bytes=image_bytes,
            image_format=image_format,
            meta=meta,
        )
        if problem is not None:  # a part that was refused is the root cause of anything missing
            sample.fail(problem.reason, problem.detail)
        if image_bytes is None:
            sample.fail(errors.MISSING_IMAGE, missing_image_detail or f"{key}: no image")
        if caption is None:
            sample.fail(errors.MISSING_CAPTION, f"{key}: no caption")
            return sample
        if metadata_error:
            sample.fail(errors.BAD_METADATA, metadata_error)
        text, valid_utf8 = _caption_text(caption if isinstance(caption, (str, bytes)) else str(caption))
        if not text.strip():
            sample.fail(errors.EMPTY_CAPTION, f"{key}: caption is empty or whitespace")
        if not valid_utf8:
            sample.fail(errors.CAPTION_ENCODING, f"{key}: caption is not valid UTF-8 (decoded with replacement)")
        limit = self.options.max_caption_chars
        if len(text) > limit:
            sample.fail(errors.CAPTION_TOO_LONG, f"{key}: caption has {len(text)} characters, cut to {limit}")
            text = text[:limit]
        sample.caption = text
        return sample

    def from_members(
        self, key: str, members: Mapping[str, bytes], problem: SampleProblem | None = None, seen: tuple[str, ...] = ()
    ) -> Sample:
        """A sample from WebDataset-style parts ``{ext: bytes}`` (tar members or sidecar files).

        ``seen`` names every extension the pair had, read or not (for the missing-image detail)."""
        opts = self.options
        image_ext = next((ext for ext in opts.member_image_exts if ext in members), None)
        meta, metadata_error = _parse_metadata(members.get(opts.metadata_key), key)
        found = ", ".join(sorted(set(seen) | set(members)))
        return self.build(
            key,
            image_bytes=members[image_ext] if image_ext else None,
            image_format=image_ext.rsplit(".", 1)[-1] if image_ext else None,
            caption=members.get(opts.member_caption_key),
            meta=meta,
            missing_image_detail=f"{key}: no {'/'.join(opts.member_image_exts)} member (found: {found})",
            metadata_error=metadata_error,
            problem=problem,
        )

    def wanted_extensions(self) -> set[str]:
        """The member extensions a sample is built from; others are never read."""
        opts = self.options
        return {*opts.member_image_exts, opts.member_caption_key, opts.metadata_key}


def _caption_text(caption: bytes | str) -> tuple[str, bool]:
    """(text, was valid UTF-8). Strings may carry surrogate escapes from a file decoded with
    errors="surrogateescape"; those are bytes that were not UTF-8."""
    if isinstance(caption, str):
        try:
            caption.encode("utf-8")
            return caption, True
        except UnicodeEncodeError:
            caption = caption.encode("utf-8", "surrogateescape")
    try:
        return caption.decode("utf-8"), True
    except UnicodeDecodeError:
        return caption.decode("utf-8", errors="replace"), False


def _parse_metadata(raw: bytes | None, key: str) -> tuple[dict[str, Any], str | None]:
    if raw is None:
        return {}, None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, f"{key}: json does not parse: {exc}"
    except RecursionError:  # a hostile json nested thousands deep: this pair's problem, not the shard's
        return {}, f"{key}: json nests too deeply"
    if not isinstance(meta, dict):
        return {}, f"{key}: json is a {type(meta).__name__}, expected an object"
    return meta, None


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset key/extension split: ``dir/000001.seg.png`` -> (``dir/000001``, ``seg.png``).

    None for names with no extension or a hidden basename (``._foo.jpg``, ``.DS_Store``)."""
    directory, _, basename = name.rpartition("/")
    stem, dot, ext = basename.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def extension(path: str) -> str | None:
    _, dot, ext = posixpath.basename(path).rpartition(".")
    return ext.lower() if dot and ext else None


_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),  # little-endian TIFF
    (b"MM\x00*", "tiff"),  # big-endian TIFF
)


def sniff_image_format(data: bytes | None) -> str | None:
    """File extension from the leading magic bytes, for image bytes that came without a name."""
    if not data:
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)
