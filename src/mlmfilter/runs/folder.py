"""The run folder: everything a run leaves behind, inspectable and resumable without a database.

    RUN/config.yaml           resolved config (+ fingerprint) of the first run into this folder
    RUN/provenance.json       what produced the scores: models, preprocessing, versions, warnings
    RUN/scores/<shard>.parquet one table per input shard, keyed by uid
    RUN/stats/<shard>.json    per-shard counts and timings
    RUN/completions/<shard>   written last: a shard with a marker is done and is skipped on resume
    RUN/logs/                 one log per process
    RUN/stats.json            merged stats of all completed shards
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from mlmfilter.io.writers import atomic_write, atomic_write_json


class ConfigMismatch(RuntimeError):
    pass


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.scores_dir = self.path / "scores"
        self.stats_dir = self.path / "stats"
        self.completions_dir = self.path / "completions"
        self.logs_dir = self.path / "logs"
        self.config_path = self.path / "config.yaml"
        self.provenance_path = self.path / "provenance.json"

    def create(self) -> "RunFolder":
        for d in (self.scores_dir, self.stats_dir, self.completions_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # -- per shard ----------------------------------------------------------------------------
    def score_path(self, shard_id: str) -> Path:
        return self.scores_dir / f"{shard_id}.parquet"

    def is_done(self, shard_id: str) -> bool:
        return (self.completions_dir / shard_id).exists()

    def mark_done(self, shard_id: str, stats: dict[str, Any]) -> None:
        atomic_write_json(self.stats_dir / f"{shard_id}.json", stats)
        atomic_write(self.completions_dir / shard_id, "done\n")

    def done_shards(self) -> list[str]:
        if not self.completions_dir.exists():
            return []
        return sorted(p.name for p in self.completions_dir.iterdir() if not p.name.startswith("."))

    # -- whole run ----------------------------------------------------------------------------
    def check_or_write_config(self, config_dump: dict[str, Any], fingerprint: str, overwrite: bool = False) -> None:
        """First run writes the config; a resume must score the same way, or it would mix scores."""
        if self.config_path.exists() and not overwrite:
            previous = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
            if previous.get("fingerprint") != fingerprint and self.done_shards():
                raise ConfigMismatch(
                    f"{self.path} holds a run with different scorer settings "
                    f"(fingerprint {previous.get('fingerprint')} vs {fingerprint}); "
                    "use another output folder, or --overwrite to start it afresh"
                )
        atomic_write(self.config_path, yaml.safe_dump({**config_dump, "fingerprint": fingerprint}, sort_keys=False))

    def clear(self) -> None:
        for d in (self.scores_dir, self.stats_dir, self.completions_dir):
            if d.exists():
                for p in d.iterdir():
                    p.unlink()

    def write_provenance(self, provenance: dict[str, Any]) -> None:
        atomic_write_json(self.provenance_path, provenance)

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8"))

    def merged_stats(self) -> dict[str, Any]:
        """Sum of the per-shard stats of every completed shard."""
        totals: Counter = Counter()
        errors: Counter = Counter()
        scorers: dict[str, Counter] = {}
        seconds = 0.0
        for shard_id in self.done_shards():
            path = self.stats_dir / f"{shard_id}.json"
            if not path.exists():
                continue
            stats = json.loads(path.read_text(encoding="utf-8"))
            totals.update({k: stats[k] for k in ("read", "ok", "errored")})
            errors.update(stats.get("errors", {}))
            seconds += stats.get("seconds", 0.0)
            for name, s in stats.get("scorers", {}).items():
                scorers.setdefault(name, Counter()).update(
                    {k: v for k, v in s.items() if isinstance(v, (int, float)) and k != "pairs_per_second"}
                )
        return {
            "shards_done": len(self.done_shards()),
            **{k: totals.get(k, 0) for k in ("read", "ok", "errored")},
            "errors": dict(sorted(errors.items())),
            "shard_seconds": round(seconds, 3),
            "scorers": {k: dict(v) for k, v in scorers.items()},
        }
