"""How a shard is read: which columns and extensions hold what, and what one sample may cost."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGE_BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes", "img", "bytes")
IMAGE_PATH_COLUMNS = ("image_path", "path", "file", "file_name", "filename", "image_file", "image", "img")
CAPTION_COLUMNS = ("caption", "txt", "text")
CAPTIONS_FILES = ("captions.jsonl", "captions.csv", "captions.tsv")


class ReadOptions(BaseModel):
    """How to find images, captions, uids and keys. Column names left as None are auto-detected."""

    model_config = ConfigDict(extra="forbid")

    caption_key: str = "txt"  # tar / sidecar extension of the caption
    metadata_key: str = "json"  # tar / sidecar extension of the metadata
    image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")  # in order of preference
    image_column: str | None = None  # parquet: image bytes (binary or {bytes, path} struct)
    image_path_column: str | None = None  # parquet/captions file: image path
    caption_column: str | None = None
    uid_column: str | None = None
    key_column: str | None = None
    captions_file: str | None = None  # folder: name of the captions table inside it
    max_caption_chars: int = 10_000
    parquet_batch_rows: int = 256  # rows per arrow batch: bounds memory with large image bytes
    # What one tar member, image file or parquet image value may cost, checked before it is read
    # (a sample image is rarely above 20 MB); larger ones become `member_too_large` rows.
    max_member_bytes: int = Field(default=64 * 2**20, gt=0)
    # Image paths (parquet column, captions table) may name files outside the dataset's folder,
    # absolute paths and URLs (s3://, http://). Off: those rows are `unsafe_path` errors.
    allow_absolute_paths: bool = False

    @field_validator("image_exts")
    @classmethod
    def _lower_case(cls, exts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(ext.lower().lstrip(".") for ext in exts)  # member extensions are compared lower-cased
