"""A released judge by its hub id (or a local copy in its original layout): download, convert once, reuse.

``--model weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o`` names a checkpoint saved by the code that
trained it, which transformers cannot load. :func:`converted_judge` makes it loadable:

1. read its ``config.json`` (a hub id through the hub cache: one small file, or none offline) and
   detect the layout (:func:`~mlmfilter.convert.detect.detect_layout`); anything that is not an
   original layout (a transformers folder, a served model name, a name that cannot be found) is
   left to the ordinary loaders (None);
2. the revision: the hub commit of that config.json, or for a local folder the hash of its contents;
3. the cache entry ``<root>/converted/<models--org--name|local-folder>/<revision>/v<CONVERTER_VERSION>``
   (root: ``$MLMFILTER_CACHE``, else ``$XDG_CACHE_HOME/mlmfilter``, else ``~/.cache/mlmfilter``).
   A complete entry (its ``mlmfilter_conversion.json`` written) is used as it is: no download, no
   conversion. A new revision on the hub is a new entry, converted again;
4. otherwise, under a file lock beside the entry: download the checkpoint (``snapshot_download``,
   weights as safetensors when the repo has them, else its ``.bin`` shards) and the vision tower its
   config names (or the judge registry's, when the config names a path of the author's machine),
   with a progress bar on a terminal; convert into a temporary folder beside the entry and rename it
   into place. Two workers or two partition jobs asking at once convert once: the second waits for
   the lock and finds the entry complete; a conversion killed half-way leaves only a temporary folder,
   never an entry.

Offline (``HF_HUB_OFFLINE=1``) everything comes from the hub cache; a judge converted before works
even when its original snapshot was deleted since, as long as the cache's ``refs/main`` names it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mlmfilter.convert.detect import LAYOUTS, converter, detect_layout
from mlmfilter.core.errors import ModelUnavailableError
from mlmfilter.judge.registry import ReleasedJudge, identify, judge_of_hub_id

log = logging.getLogger(__name__)

#: bump when a converter writes other weights, config or processor for the same source: every cached
#: conversion is then redone once (a run's identity names the version its scores came from)
CONVERTER_VERSION = "1"
CACHE_ENV = "MLMFILTER_CACHE"
#: written last into a converted folder: its presence is what makes a cache entry complete
MARKER = "mlmfilter_conversion.json"
#: a hub repo id (``org/name``); a path never matches (``./x``, ``/x``, ``a/b/c``)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ORIGINAL_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "hf")
#: the files of a checkpoint besides its weights: configs, tokenizer (json, txt, sentencepiece, tiktoken)
_SIDE_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]
_SAFETENSORS = ["*.safetensors"]
_PICKLES = ["pytorch_model*.bin"]


def cache_root() -> Path:
    """Where converted judges are kept: ``$MLMFILTER_CACHE``, else ``$XDG_CACHE_HOME/mlmfilter``, else
    ``~/.cache/mlmfilter``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlmfilter"


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


@dataclass(frozen=True)
class ConvertedJudge:
    """A released judge converted into the cache: where from, which revision, by which converter."""

    requested: str  # what the user named (hub id or folder)
    repo: str | None  # hub repo id; None for a local folder
    revision: str  # hub commit, or "sha256:<content hash>" of a local folder
    layout: str  # llava-1.5 / llava-unified / aitqe
    converter_version: str
    vision_tower: dict[str, str]  # {"repo", "revision"} or {"content_hash", "cache_path"}
    path: Path  # the converted folder transformers loads
    converted_now: bool = False  # this call converted it (else it came from the cache)
    seconds: float = 0.0  # what the download and conversion took, when converted now
    judge: str | None = field(default=None)  # the registry key, when identified

    @property
    def model_identity(self) -> str:
        """The model as a run's identity names it: the hub id, or a local folder by its content."""
        return self.repo or f"local:{self.revision}"

    def describe(self) -> dict[str, Any]:
        """Provenance and identity: the source, never where this machine keeps it (``cache_path`` is volatile)."""
        return {
            "repo": self.repo,
            "revision": self.revision,
            "layout": self.layout,
            "converter_version": self.converter_version,
            "vision_tower": dict(self.vision_tower),
            "released_judge": self.judge,
            "cache_path": str(self.path),
        }


def converted_judge(name: str, *, dtype: str = "auto") -> ConvertedJudge | None:
    """The converted folder of the original-layout checkpoint ``name`` (hub id or folder), converting it
    into the cache the first time; None when ``name`` is not an original layout (or cannot be found:
    the ordinary loaders then say so, or fall back as the user asked).

    Raises :class:`~mlmfilter.core.errors.ModelUnavailableError` when a part it needs (weights, the
    vision tower) cannot be had, and ``LlavaConversionError`` (a ValueError) when it cannot convert.
    """
    source = _original_source(name)
    if source is None:
        return _entry_by_ref(name, dtype)
    entry = source.entry(dtype)
    found = _read_entry(entry, name)
    if found is not None:
        return found
    from filelock import FileLock

    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        found = _read_entry(entry, name)  # another process converted it while this one waited
        if found is not None:
            log.info("%s: converted by another process meanwhile; using %s", name, entry)
            return found
        return _convert_into(source, entry, dtype)


def cached_conversion(name: str, *, dtype: str = "auto") -> ConvertedJudge | None:
    """The cache entry of ``name`` if it was converted before; never downloads weights or converts."""
    source = _original_source(name)
    return _read_entry(source.entry(dtype), name) if source is not None else _entry_by_ref(name, dtype)


def original_config(name: str) -> dict[str, Any] | None:
    """``name``'s config.json when it is an original-layout checkpoint (a folder, or one small file through
    the hub cache), else None."""
    source = _original_source(name)
    return source.config if source is not None else None


def original_tokenizer_folder(name: str) -> Path:
    """A folder holding ``name``'s config and tokenizer files (for a hub id only those are fetched)."""
    source = _original_source(name)
    if source is None:
        raise ValueError(f"{name} is not an original-layout checkpoint")
    if source.folder is not None:
        return source.folder
    assert source.repo is not None
    return _snapshot(source.repo, source.revision, _SIDE_FILES)


# -- where the original is ----------------------------------------------------------------------------


@dataclass
class _OriginalSource:
    requested: str
    config: dict[str, Any]
    layout: str
    repo: str | None
    revision: str
    folder: Path | None  # a local original folder (hub checkpoints are fetched when converting)

    @property
    def judge(self) -> ReleasedJudge | None:
        return identify(self.config) or (judge_of_hub_id(self.repo) if self.repo else None)

    def entry(self, dtype: str) -> Path:
        return entry_path(self.repo, self.revision, dtype)

    def fetch(self) -> Path:
        if self.folder is not None:
            return self.folder
        assert self.repo is not None
        log.info("downloading %s (revision %s) ...", self.repo, self.revision[:12])
        return _snapshot(self.repo, self.revision, _SIDE_FILES + _weight_patterns(self.repo, self.revision))


def _original_source(name: str) -> _OriginalSource | None:
    path = Path(name).expanduser()
    if path.is_dir():
        config = _read_json(path / "config.json")
        layout = _original_layout(config)
        if config is None or layout is None:
            return None
        if not any(any(path.glob(pattern)) for pattern in ("model*.safetensors", "pytorch_model*.bin")):
            return None  # no weights to convert: the loaders say what the folder is and how to convert it
        from mlmfilter.core.identity import directory_hash

        return _OriginalSource(name, config, layout, None, "sha256:" + directory_hash(path), path)
    if not is_hub_id(name):
        return None
    config_file = _hub_file(name, "config.json")
    if config_file is None:
        return None
    config = _read_json(Path(config_file))
    layout = _original_layout(config)
    if config is None or layout is None:
        return None
    revision = Path(config_file).parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json
    return _OriginalSource(name, config, layout, name, revision, None)


def _entry_by_ref(name: str, dtype: str) -> ConvertedJudge | None:
    """Offline, with the original snapshot deleted from the hub cache since it was converted: the entry of
    the revision the hub cache's ``refs/main`` still names."""
    if not is_hub_id(name):
        return None
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / ("models--" + name.replace("/", "--")) / "refs" / "main"
        revision = ref.read_text(encoding="utf-8").strip()
    except (OSError, ImportError):
        return None
    return _read_entry(entry_path(name, revision, dtype), name)


def entry_path(repo: str | None, revision: str, dtype: str = "auto") -> Path:
    """Where the conversion of ``repo`` at ``revision`` (None: a local folder, by its content hash) lives."""
    owner = "models--" + repo.replace("/", "--") if repo else "local-folders"
    leaf = f"v{CONVERTER_VERSION}" + ("" if dtype == "auto" else f"-{dtype}")
    return cache_root() / "converted" / owner / revision.replace(":", "-") / leaf


def _original_layout(config: Mapping[str, Any] | None) -> str | None:
    if not config:
        return None
    try:
        layout = detect_layout(config)
    except ValueError:  # not a vision-language model at all: the loaders say what it is
        return None
    return layout if layout in _ORIGINAL_LAYOUTS else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _hub_file(repo: str, filename: str) -> str | None:
    """One file of a hub repo through the hub cache (its current revision online, the cached one
    offline); None when it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # noqa: BLE001 - offline and not cached, no such repo, no access
        log.debug("%s/%s not available: %s", repo, filename, exc)
        return None


def _weight_patterns(repo: str, revision: str) -> list[str]:
    """The repo's safetensors when it has them, else its pickled shards (read with weights_only)."""
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo, revision=revision)
    except Exception:  # noqa: BLE001 - offline: the cache holds what it holds, both patterns match it
        return _SAFETENSORS + _PICKLES
    return _SAFETENSORS if any(f.endswith(".safetensors") for f in files) else _PICKLES


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=patterns, tqdm_class=_progress_bar_class())
        )
    except Exception as exc:  # noqa: BLE001 - offline and not cached, no access, no disk: one clear line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "the hub is offline here (HF_HUB_OFFLINE): download it once on a machine with internet "
            f"(`hf download {repo}`) and copy the cache (HF_HOME) here"
            if offline
            else f"check the name, your access to it and the disk (`hf download {repo}` shows the hub's answer)"
        )
        raise ModelUnavailableError(
            f"cannot get {repo}{'@' + revision[:12] if revision else ''} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); {hint}"
        ) from exc


def _progress_bar_class():
    """A plain tqdm bar for the download: shown on a terminal even where the CLI turns the hub's own
    bars off (``HF_HUB_DISABLE_PROGRESS_BARS``, to keep third-party chatter away), never in a log file."""
    from tqdm.auto import tqdm

    class DownloadBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.pop("name", None)
            kwargs.setdefault("disable", None)  # None: only when stderr is a terminal
            super().__init__(*args, **kwargs)

    return DownloadBar


# -- the vision tower -----------------------------------------------------------------------------------


def _tower_name(config: Mapping[str, Any], judge: ReleasedJudge | None) -> str | None:
    """The tower the original loader runs: the one config.json names, when that is a hub id or a folder
    here; else the registry's (configs saved on the author's machine name a path there)."""
    named = config.get("mm_vision_tower") or config.get("vision_tower") or config.get("vision_model_name_or_path")
    if isinstance(named, str) and named and (is_hub_id(named) or Path(named).expanduser().is_dir()):
        return named
    if judge is not None and judge.vision_tower:
        if named:
            log.info("config.json names the vision tower %r, not found here: using %s", named, judge.vision_tower)
        return judge.vision_tower
    return None


def _fetch_tower(name: str, layout: str) -> tuple[Path, dict[str, str]]:
    """The tower's local folder and how it is identified. AITQE stores the tower's weights in its own
    checkpoint: only the tower's config and preprocessor settings are read then."""
    path = Path(name).expanduser()
    if path.is_dir():
        from mlmfilter.core.identity import directory_hash

        # by its content: where it lies on this machine is no part of a run's identity (cache_path is volatile)
        return path, {"content_hash": directory_hash(path), "cache_path": str(path.resolve())}
    patterns = list(_SIDE_FILES)
    if layout != "aitqe":
        patterns += _weight_patterns(name, "main")
    log.info("downloading the vision tower %s ...", name)
    folder = _snapshot(name, None, patterns)
    return folder, {"repo": name, "revision": folder.name}


# -- converting ------------------------------------------------------------------------------------------


def _read_entry(entry: Path, requested: str) -> ConvertedJudge | None:
    record = _read_json(entry / MARKER)
    if record is None:
        return None
    return ConvertedJudge(
        requested=requested,
        repo=record.get("repo"),
        revision=str(record["revision"]),
        layout=str(record["layout"]),
        converter_version=str(record["converter_version"]),
        vision_tower=dict(record.get("vision_tower") or {}),
        path=entry,
        judge=record.get("released_judge"),
    )


def _convert_into(source: _OriginalSource, entry: Path, dtype: str) -> ConvertedJudge:
    started = time.perf_counter()
    judge = source.judge
    tower_name = _tower_name(source.config, judge)
    if tower_name is None and source.layout != "aitqe":
        raise ValueError(
            f"{source.requested}: config.json names no vision tower and it is not a released judge this tool "
            "knows; convert it yourself: `mlmfilter convert SRC DST --vision-tower TOWER`"
        )
    folder = source.fetch()
    tower_folder, tower = _fetch_tower(tower_name, source.layout) if tower_name else (None, {})
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # left by a killed conversion (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists():  # a folder without its marker is not an entry: never used, replaced
        shutil.rmtree(entry)
    temporary = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    what = source.repo or str(source.folder)
    log.info("converting %s (%s layout, revision %s) into %s ...", what, source.layout, source.revision[:12], entry)
    try:
        converter(source.layout)(
            folder, temporary, dtype=dtype, vision_tower=str(tower_folder) if tower_folder else None
        )
        record = {
            "repo": source.repo,
            "revision": source.revision,
            "layout": source.layout,
            "converter_version": CONVERTER_VERSION,
            "vision_tower": tower,
            "released_judge": judge.key if judge else None,
            "dtype": dtype,
            "source_folder": str(folder),
            "seconds": round(time.perf_counter() - started, 3),
        }
        (temporary / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.rename(temporary, entry)  # atomic: an entry is either absent or whole
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("converted %s in %.1f s; later runs reuse %s", what, seconds, entry)
    converted = _read_entry(entry, source.requested)
    assert converted is not None
    return ConvertedJudge(**{**converted.__dict__, "converted_now": True, "seconds": seconds})


# -- for the scorers ------------------------------------------------------------------------------------


def with_converted_model(options: Any, option: str = "model") -> tuple[Any, ConvertedJudge | None]:
    """``options`` (a scorer's pydantic options) with ``option`` pointing at the converted folder when it
    names an original-layout checkpoint, and the :class:`ConvertedJudge` (else ``options`` as they are, None)."""
    converted = converted_judge(str(getattr(options, option)))
    if converted is None:
        return options, None
    if converted.converted_now:
        log.info("%s is ready: %s", converted.requested, converted.path)
    return options.model_copy(update={option: str(converted.path)}), converted


def describe_converted_model(model: dict[str, Any], converted: ConvertedJudge) -> dict[str, Any]:
    """A model's provenance (``model_source`` keys) naming what the user asked for and the converted source
    (repo, revision, converter version) instead of this machine's cache folder, so that a run's identity
    is the same on every machine and changes with a new revision or converter."""
    out = {k: v for k, v in model.items() if k not in ("local_path", "content_hash")}
    out["model"] = converted.model_identity
    out["converted"] = converted.describe()
    return out
