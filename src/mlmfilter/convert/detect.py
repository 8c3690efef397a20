"""Which code saved a checkpoint, and the one entry point that converts any released judge.

The layout is detected from the checkpoint's config.json:

- ``llava-1.5``: haotian-liu/LLaVA (the 13B MLM-Filter judges) -> :mod:`mlmfilter.convert.llava`
- ``llava-unified``: Victorwz/LLaVA-Unified (Llama-3.x / Qwen2.5 judges, SigLIP, ``aapool_mlp``)
  -> :mod:`mlmfilter.convert.unified`
- ``aitqe``: hanhuang22/AITQE ``MMForCausalLM`` -> :mod:`mlmfilter.convert.aitqe`
- ``hf``: already a transformers folder (nothing to do)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from mlmfilter.judge.registry import identify

LAYOUTS = ("llava-1.5", "llava-unified", "aitqe", "hf")


def detect_layout(config: Mapping[str, Any]) -> str:
    """Which original code saved this config.json (see the module docstring); ValueError if none."""
    if config.get("model_type") == "mm" and "image_tile_tokens" in config:
        return "aitqe"
    if "mm_vision_tower" in config or "mm_projector_type" in config:
        judge = identify(config)
        if judge is not None and judge.key == "mlm-filter-llava-13b":
            return "llava-1.5"
        arch = " ".join([str(config.get("model_type", "")), *map(str, config.get("architectures") or [])]).lower()
        unified = (
            "qwen" in arch
            or config.get("mm_projector_type") == "aapool_mlp"
            or "siglip" in str(config.get("mm_vision_tower", "")).lower()
        )
        return "llava-unified" if unified or judge is not None else "llava-1.5"
    if "text_config" in config and "vision_config" in config:
        return "hf"
    raise ValueError(
        "config.json is neither an original LLaVA(-Unified) checkpoint (mm_* fields), an AITQE checkpoint "
        "(image_tile_tokens) nor a transformers vision-language model"
    )


def local_folder(src: str | Path) -> Path:
    """A local folder as is; a hub id through the hub cache (a download unless HF_HUB_OFFLINE is set)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src)))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no access: one clear line
        raise FileNotFoundError(
            f"{src} is not a local folder and cannot be fetched from the hub ({type(exc).__name__}: {exc})"
        ) from exc


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "auto", vision_tower: str | None = None
) -> tuple[str, Path]:
    """Detect ``src``'s layout and convert it into ``dst``; returns (layout, output folder).

    ``src``: a local folder or a hub id; ``dtype``: auto (keep), fp32, bf16, fp16; ``vision_tower``:
    the tower's hub id or folder (default: the one config.json names).
    """
    folder = local_folder(src)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    layout = detect_layout(json.loads(config_file.read_text(encoding="utf-8")))
    if layout == "hf":
        raise ValueError(f"{folder} is already a transformers model folder: score with it directly (no conversion)")
    return layout, converter(layout)(folder, dst, dtype=dtype, vision_tower=vision_tower)


def converter(layout: str):
    """The conversion function of an original layout (imported here: the converters need torch)."""
    if layout == "llava-1.5":
        from mlmfilter.convert.llava import convert_llava_checkpoint

        return convert_llava_checkpoint
    if layout == "llava-unified":
        from mlmfilter.convert.unified import convert_unified_checkpoint

        return convert_unified_checkpoint
    if layout == "aitqe":
        from mlmfilter.convert.aitqe import convert_aitqe_checkpoint

        return convert_aitqe_checkpoint
    raise ValueError(f"no converter for layout {layout!r}; original layouts: llava-1.5, llava-unified, aitqe")
