"""Per-sample error reasons. They are column values in score tables, so keep them stable."""

# reading
TRUNCATED_SHARD = "truncated_shard"  # the tar ends mid-member; members before it are kept
UNREADABLE_SHARD = "unreadable_shard"  # the shard cannot be opened at all
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
BAD_METADATA = "bad_metadata"  # the sample's json does not parse
MEMBER_TOO_LARGE = "member_too_large"  # a tar member / image file / bytes value over ReadOptions.max_member_bytes
NOT_A_REGULAR_FILE = "not_a_regular_file"  # a folder entry that is a FIFO, device or socket: never opened
UNSAFE_MEMBER = "unsafe_member"  # a tar member with an absolute or ``..`` name, or a link/device/FIFO member
UNSAFE_PATH = "unsafe_path"  # an image path or symlink leading outside the dataset root (or a URL), not allowed
# captions
EMPTY_CAPTION = "empty_caption"
CAPTION_ENCODING = "caption_not_utf8"  # kept decoded with replacement characters, but an error row: not scored
CAPTION_TOO_LONG = "caption_too_long"
# images
EMPTY_IMAGE = "empty_image"
UNDECODABLE_IMAGE = "undecodable_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
DECODE_TIMEOUT = "decode_timeout"  # a decoder process hung on this image twice
# scoring
SCORER_ERROR = "scorer_error"  # an exception inside a scorer, isolated to this sample
UNPARSEABLE_SCORE = "unparseable_score"  # a generated answer that is not a number

#: the errors that mean "the reader looked in the wrong place", not "the data is bad": a shard whose
#: every row has one of them was read with the wrong read options (or could not be opened at all)
LAYOUT_ERRORS = frozenset({MISSING_CAPTION, MISSING_IMAGE, UNREADABLE_SHARD})


class ModelUnavailableError(RuntimeError):
    """A model can be neither found locally nor downloaded (torch-free, so the CLI can catch it cheaply)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a command part-way; says what was done and how to go on.

    A ``KeyboardInterrupt``, so code that knows nothing of it still stops; the command line prints
    :meth:`line` and exits 130. ``done`` of ``total`` ``unit`` (``"24 of 96 labels"``) were finished."""

    def __init__(self, done: int, total: int, unit: str, then: str = "re-run the same command to resume"):
        self.done, self.total, self.unit, self.then = done, total, unit, then
        super().__init__(self.line())

    def line(self) -> str:
        return f"interrupted: {self.done} of {self.total} {self.unit} done; {self.then}"


class InfrastructureError(RuntimeError):
    """The machine failed, not the sample (out of memory, a dead device): the shard fails and is retried."""


def is_infrastructure_failure(exc: BaseException) -> bool:
    """Memory exhaustion and device loss are never a sample's fault; they must not become error rows."""
    return isinstance(exc, (MemoryError, InfrastructureError)) or type(exc).__name__ in (
        "OutOfMemoryError",  # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError
        "AcceleratorError",
    )


def validation_message(exc: Exception) -> str:
    """A pydantic ``ValidationError`` as one line: ``field.path: message`` per problem, joined by ``; ``.

    Duck-typed (anything with ``errors()`` in pydantic's shape), so the core stays free of pydantic.
    """
    problems = []
    for error in exc.errors():  # type: ignore[attr-defined]
        where = ".".join(map(str, error.get("loc") or ()))
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)
