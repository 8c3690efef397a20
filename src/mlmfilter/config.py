"""Run configuration: one pydantic model, filled from CLI flags or a YAML recipe with the same fields."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ScorerSpec(BaseModel):
    """A scorer by registry name plus its options (validated by the scorer's own Options model)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str]
    output: str
    scorers: list[ScorerSpec] = Field(default_factory=lambda: [ScorerSpec(name="rules")])
    read: dict[str, Any] = Field(default_factory=dict)  # mlmfilter.io.readers.ReadOptions fields
    workers: int = 1  # shards scored in parallel, one process each
    decode_workers: int = 1  # image-decoding processes feeding each shard worker (0: decode inline)
    chunk_size: int = 64  # samples handed to the scorers at a time (decoding runs a chunk ahead)
    max_pixels: int = 89_478_485  # decompression-bomb limit on the source image
    allow_pipe: bool = False  # let `pipe:` input specs run shell commands

    @field_validator("scorers", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        # a recipe may list plain names: `scorers: [rules, clip]`
        if isinstance(value, (list, tuple)):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def fingerprint(self) -> str:
        """Hash of everything that changes the scores; a resumed run must have the same one."""
        relevant = self.model_dump(include={"scorers", "read", "max_pixels"})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of ScoreConfig fields")
    return data
