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
#: the judge put less than its ``min_mass`` of probability on the numbers 0..100: its expected score
#: would be the mean of noise, so the metric's score is null (its ``<m>_mass`` still says how much)
LOW_SCORE_MASS = "low_score_mass"

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


class MissingCredentialsError(ValueError):
    """Object storage refused for want of credentials; the message names them and how to give them."""


#: exception class names (botocore, google-auth, azure-identity) that mean "no credentials were found"
_NO_CREDENTIALS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "DefaultCredentialsError",
        "CredentialUnavailableError",
        "ClientAuthenticationError",
    }
)

#: per storage protocol: whose credentials, and how to give them
_CREDENTIAL_HINTS = {
    "s3": (
        "AWS",
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials, an instance role); "
        "for a public bucket set FSSPEC_S3_ANON=true; another endpoint: FSSPEC_S3_ENDPOINT_URL=https://...",
    ),
    "gs": (
        "Google Cloud",
        "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS=key.json; "
        "for a public bucket set FSSPEC_GCS_TOKEN=anon",
    ),
    "az": (
        "Azure",
        "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY",
    ),
}
_PROTOCOL_FAMILY = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "abfs": "az",
    "abfss": "az",
    "adl": "az",
}


def credentials_problem(exc: BaseException, location: str | None = None) -> str | None:
    """One line naming the missing object-storage credentials and how to give them, when ``exc`` (or
    an exception it was raised from) means none were found; None otherwise. Read by class name, so
    the core imports no cloud library."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _NO_CREDENTIALS:
            break
        current = current.__cause__ or current.__context__
    else:
        return None
    if current is None:
        return None
    protocol = location.split("://", 1)[0].lower() if location and "://" in location else ""
    family = _PROTOCOL_FAMILY.get(protocol) or ("s3" if "botocore" in type(current).__module__ else "")
    who, how = _CREDENTIAL_HINTS.get(family, ("object storage", "give the storage's credentials in its usual way"))
    where = f" for {location}" if location else ""
    return f"no {who} credentials{where} ({type(current).__name__}: {str(current).strip()}): {how}"
