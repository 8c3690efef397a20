"""Helpers every model backend shares: device and dtype resolution, model-source and version provenance.

Kept free of any one model family so the CLIP and MLM backends resolve "auto" the same way.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import torch

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}

#: distributions whose versions decide what a score means (metadata only: nothing is imported)
_PROVENANCE_DISTRIBUTIONS = ("mlmfilter", "torch", "transformers", "tokenizers", "pillow", "numpy", "safetensors")


from mlmfilter.core.errors import ModelUnavailableError  # noqa: E402  (re-exported: loaders raise it)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else is checked to exist on this machine."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but this torch build sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    return device


def may_use_gpu(device: str) -> bool:
    """A ``device`` setting that runs on a CUDA GPU or may pick one ("auto"): neither cpu nor mps.

    Read from the setting alone, nothing probed: the executor hands out GPUs before any model loads.
    """
    return str(device) not in ("cpu", "mps")


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX-BF16).

    Without them torch emulates bf16 and it is slower than fp32, so "auto" must not pick it.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:  # not Linux: be conservative
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """Map "auto"/"fp32"/"bf16"/"fp16"/"float32"/... to a torch dtype for ``device``.

    auto: bf16 on a GPU that supports it (else fp16), bf16 on a CPU with native bf16 (else fp32),
    fp32 elsewhere (mps).
    """
    if isinstance(name, torch.dtype):
        return name
    device = torch.device(device)
    key = (name or "auto").strip().lower().removeprefix("torch.")
    if key != "auto":
        try:
            return _DTYPE_ALIASES[key]
        except KeyError:
            known = ", ".join(["auto", *_DTYPE_ALIASES])
            raise ValueError(f"unknown dtype {name!r}; known: {known}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """Short stable name for provenance: "bf16", "fp16", "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a score depends on (None where one is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _PROVENANCE_DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def model_source(name_or_path: str, filename: str = "config.json") -> dict[str, Any]:
    """Where a model's files came from: a local directory, or a hub id with its cached commit.

    Call it after the model's ``filename`` was fetched; it only looks into the local cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {"model": name_or_path, "local_path": str(path.resolve())}
    source: dict[str, Any] = {"model": name_or_path, "hub_id": name_or_path}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, filename)
    except Exception:  # an odd name must not break provenance
        cached = None
    if isinstance(cached, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
        source["commit"] = Path(cached).parent.name
        source["cache_path"] = str(Path(cached).parent)
    return source


def safe_pretrained_kwargs(**kwargs: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments for configs, tokenizers and processors: a model folder or repo is
    data, never code, so ``auto_map`` entries pointing at its python files are never imported."""
    return {"trust_remote_code": False, **kwargs}


def safe_weights_kwargs(**kwargs: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments for models: no remote code, and weights are never unpickled
    (safetensors only; ``.bin`` files, where a caller allows them, only through ``weights_only``)."""
    return {"trust_remote_code": False, "use_safetensors": True, "weights_only": True, **kwargs}


def refuse_pickle_only_folder(name_or_path: str) -> None:
    """A clear refusal for a local model folder whose weights exist only as pickles (``*.bin``, ``*.pt``)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pattern))
    if pickles:
        raise ValueError(
            f"{name_or_path}: weights only as pickle files ({', '.join(pickles[:3])}); mlmfilter loads "
            "safetensors only, since unpickling can run arbitrary code. Convert them once on a machine "
            "you trust (load with torch.load(weights_only=True), save with safetensors.torch.save_file)."
        )


def local_path_typo(name_or_path: str) -> str | None:
    """When a model name reads as a mistyped local folder (``models/clipp`` beside ``models/clip``,
    ``clipp`` beside ``./clip``), the message saying so; None when it reads as a hub id."""
    import difflib

    path = Path(name_or_path).expanduser()
    parent = path.parent
    if path.exists() or not parent.is_dir():
        return None
    folders = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    close = difflib.get_close_matches(path.name, folders, n=1, cutoff=0.75)
    if close:
        return f"no model folder {name_or_path!r} here; did you mean {str(parent / close[0])!r}?"
    if parent != Path(".") and "/" in name_or_path.rstrip("/") and len(name_or_path.split("/")) == 2:
        # org/name of the hub, unless a folder of that name is here: then it is a path
        return f"no model folder {name_or_path!r} here: {str(parent)!r} holds no {path.name!r}"
    return None


def unavailable_message(name_or_path: str, cause: BaseException | None = None) -> str:
    """The error text for a model that cannot be found: name it and say how to get it."""
    typo = local_path_typo(name_or_path)
    if typo:
        return f"{typo} (a name that is no folder here is looked up on the Hugging Face hub, where it failed too)"
    reason = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
    return (
        f"model {name_or_path!r} is neither a local directory nor in the Hugging Face cache, "
        f"and it could not be downloaded{reason}. Either download it once on a machine with internet "
        f"(`hf download {name_or_path}`) and copy the cache "
        f"(HF_HOME) here, then run with HF_HUB_OFFLINE=1 so no network is tried; or pass the path of a "
        f"local directory holding config.json, the weights and the tokenizer/preprocessor files."
    )


from mlmfilter.models.hub import use_offline_hub  # noqa: E402,F401  (kept importable from here)


def check_model_path(name_or_path: str) -> None:
    """A name written as a path (``/x``, ``./x``, ``../x``, ``~/x``, ``a/b/c``) must exist here;
    it is never sent to the hub as a repo id, where it would fail slowly and confusingly."""
    from mlmfilter.models.hub import names_a_local_path

    if names_a_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        typo = local_path_typo(name_or_path)
        raise ModelUnavailableError(typo or f"model path {name_or_path!r} does not exist")
