"""How a shard is read: which columns and extensions hold what, and what one sample may cost."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: image formats read as images (GIF and multi-page TIFF: the first frame), in order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# Column names are matched case-insensitively (LAION writes TEXT and URL), in this order.
IMAGE_BYTES_COLUMNS = (*IMAGE_EXTS, "image", "image_bytes", "img", "bytes")
IMAGE_PATH_COLUMNS = ("image_path", "path", "file", "file_name", "filename", "image_file", "image", "img")
CAPTION_COLUMNS = ("caption", "txt", "text", "alt_text", "alt")
URL_COLUMNS = ("url", "image_url", "img_url")
#: a folder's captions table: ours first, then Hugging Face ``imagefolder``'s metadata file
CAPTIONS_FILES = ("captions.jsonl", "captions.csv", "captions.tsv", "metadata.jsonl", "metadata.csv")


class ReadOptions(BaseModel):
    """How to find images, captions, uids and keys. Column names left as None are auto-detected."""

    model_config = ConfigDict(extra="forbid")

    caption_key: str = "txt"  # tar / sidecar extension of the caption
    metadata_key: str = "json"  # tar / sidecar extension of the metadata
    image_exts: tuple[str, ...] = IMAGE_EXTS  # in order of preference
    # Columns (parquet) or fields (a folder's captions table). None: found by name, any case.
    # image_column: image bytes (binary or HF {bytes, path} struct) or, if it holds text, a path.
    image_column: str | None = None
    image_path_column: str | None = None  # parquet/captions file: image path
    caption_column: str | None = None
    uid_column: str | None = None
    key_column: str | None = None
    url_column: str | None = None  # the image URL (kept as metadata; a parquet of URLs only is told so)
    captions_file: str | None = None  # folder: name of the captions table inside it
    max_caption_chars: int = 10_000
    parquet_batch_rows: int = 256  # rows per arrow batch: bounds memory with large image bytes
    # What one tar member, image file or parquet image value may cost, checked before it is read
    # (a sample image is rarely above 20 MB); larger ones become `member_too_large` rows.
    max_member_bytes: int = Field(default=64 * 2**20, gt=0)
    # Image paths (parquet column, captions table) may name files outside the dataset's folder,
    # absolute paths and URLs (s3://, http://). Off: those rows are `unsafe_path` errors.
    allow_absolute_paths: bool = False

    # Tars and sidecar folders have no columns: there --caption-column / --image-column name the
    # member extension (``KEY.caption``, ``KEY.image.png`` -> ``caption``, ``image.png``).
    @property
    def member_caption_key(self) -> str:
        return self.caption_column.lower() if self.caption_column else self.caption_key

    @property
    def member_image_exts(self) -> tuple[str, ...]:
        return (self.image_column.lower().lstrip("."),) if self.image_column else self.image_exts

    @field_validator("image_exts")
    @classmethod
    def _lower_case(cls, exts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(ext.lower().lstrip(".") for ext in exts)  # member extensions are compared lower-cased


def find_column(names: list[str], wanted: str) -> str | None:
    """``wanted`` among ``names``: the exact name, else the one name equal to it in any case."""
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None
