"""The teach folder and its steps: sample -> negatives -> label -> balance -> export.

```
DIR/teach.json            every step's settings and report (what the dataset card is made from)
DIR/sample.parquet        the sampled pairs with their original image bytes and cluster
DIR/embeddings.npy        one embedding per usable pool pair (pool order; np.load(..., mmap_mode="r"))
DIR/embedding_uids.npy    their uids (two uint64 halves each, DataComp's layout)
DIR/negatives.parquet     corrupted variants of sampled pairs (same image, tagged corruption)
DIR/rewrites.parquet      the enhancement task's contrastive samples (caption -> target rewrite, teach/rewrites.py)
DIR/rewrite_targets.parquet  the same with the teacher's rewrites of the poor captions, or errors
DIR/labels.parquet        one row per pair and metric: score, rationale, raw reply, or an error
DIR/run/                  the run folder of the teacher's requests: stages teach_label and teach_rewrite
DIR/balanced.parquet      the labels kept by balancing, with their bin; DIR/balance.json histograms
DIR/cache/requests.sqlite the teacher request cache (answers only: no key, no headers)
DIR/batch/                Batch API request files (``label --batch-file``)
```

Every paid request is made by a stage of ``DIR/run`` (:mod:`.stage`): the labels (``teach_label``, one
shard per pair table), then the teacher's rewrites of the poor captions (``teach_rewrite``, the shard
``rewrites.parquet``). A finished shard is not asked again, a killed run resumes at the shards without
a marker, and the request cache makes a redone shard free for every answer it has (a re-run after
``--collect`` sends only the requests whose answers are missing). A shard whose table holds errors a
new request may fix is redone. Other settings, or re-made pairs, are refused unless ``relabel``
(``--relabel``) redoes the stages. ``labels.parquet`` and ``rewrite_targets.parquet`` are gathered from
the stages' tables and rewritten whole (atomically).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.clients.batch import BatchFileWriter, ingest_batch_output
from mlmfilter.clients.cache import RequestCache
from mlmfilter.clients.chat import ChatClient, ClientOptions
from mlmfilter.clients.credentials import resolve_api_key
from mlmfilter.core.errors import Interrupted
from mlmfilter.core.locations import local_path
from mlmfilter.core.sample import Sample
from mlmfilter.core.stats import ShardStats
from mlmfilter.io.sources import expand_inputs
from mlmfilter.io.writers import atomic_write_json, atomic_write_parquet
from mlmfilter.judge.prompts import resolve_metrics, short_name
from mlmfilter.runs.folder import ConfigMismatch, RunError, SourceChanged
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import Overwrite, StageSummary, run_stage
from mlmfilter.teach.balance import BalanceOptions, balance
from mlmfilter.teach.export import ExportOptions, export
from mlmfilter.teach.label import LABEL_SCHEMA, Labeler, LabelOptions, TeacherRequests
from mlmfilter.teach.pairs import image_uid, negative_uid, read_pair_table, write_pair_table
from mlmfilter.teach.stage import (
    REQUEST_COUNTERS,
    RETRYABLE,
    TeacherStage,
    TeachLabelOptions,
    TeachLabelStage,
    TeachRewriteOptions,
    TeachRewriteStage,
)


class IncompleteLabels(ValueError):
    """Balancing or exporting an incompletely labelled folder, not allowed (``--allow-incomplete``)."""


class TeachRunFailed(RuntimeError):
    """A teacher stage left shards undone (the teacher failed as a whole, or the disk filled): one line."""


class TeachFolder:
    def __init__(self, path: str | Path):
        self.path = local_path(path, "a teach folder", "it holds a sqlite request cache and the images it exports")

    # -- files ------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "teach.json"

    @property
    def cache_path(self) -> Path:
        return self.path / "cache" / "requests.sqlite"

    @property
    def run_path(self) -> Path:
        return self.path / "run"

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}

    def record(self, step: str, info: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest[step] = info
        atomic_write_json(self.manifest_path, manifest)

    def require(self, name: str, step: str) -> Path:
        path = self.path / name
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `mlmfilter teach {step}` first")
        return path

    def sampled(self) -> list[Sample]:
        """The sampled pairs (``sample.parquet``), without their negatives."""
        return read_pair_table(self.require("sample.parquet", "sample"))

    def pairs(self) -> list[Sample]:
        """The sampled pairs and their negatives: everything the teacher labels."""
        negatives = self.path / "negatives.parquet"
        return self.sampled() + (read_pair_table(negatives) if negatives.exists() else [])

    def labels(self, name: str = "labels.parquet") -> list[dict[str, Any]]:
        return pq.read_table(self.require(name, "label" if name == "labels.parquet" else "balance")).to_pylist()

    # -- steps ------------------------------------------------------------------------------------
    def sample(self, sources, options, read_options=None, run_embeddings=None) -> dict[str, Any]:
        from mlmfilter.teach.sample import PoolSampler

        sampler = PoolSampler(options, read_options, work_dir=self.path, run_embeddings=run_embeddings)
        pairs, report = sampler.sample(sources)
        write_pair_table(self.path / "sample.parquet", pairs)
        info = {**sampler.identity(), "report": report.as_dict(), "inputs": [s.url for s in sources]}
        self.record("sample", info)
        return info

    def negatives(self, kinds: Sequence[str] | None = None, seed: int = 0, rewrites: bool = True) -> dict[str, Any]:
        """``negatives.parquet`` (labelled like any pair) and, with ``rewrites``, the enhancement task's
        contrastive samples in ``rewrites.parquet`` (their poor-caption targets come from ``label``)."""
        from mlmfilter.teach.negatives import NegativeGenerator
        from mlmfilter.teach.rewrites import REWRITE_SCHEMA, make_rewrites

        generator = NegativeGenerator(seed=seed, kinds=kinds)
        pairs = self.sampled()
        captions = [p.caption for p in pairs]
        out: list[Sample] = []
        for pair in pairs:  # its own caption is never picked as "another pair's"
            for n, neg in enumerate(generator.corrupt(pair.caption, uid=pair.uid, other_captions=captions)):
                meta = {
                    "image_uid": image_uid(pair),
                    "cluster": pair.meta.get("cluster"),
                    "parent_uid": pair.uid,
                    "corruption": neg.kind,
                    "corruption_detail": neg.detail,
                }
                out.append(
                    Sample(
                        uid=negative_uid(pair.uid, neg.kind, n),
                        shard=pair.shard,
                        key=f"{pair.key}#{neg.kind}",
                        caption=neg.caption,
                        image_bytes=pair.image_bytes,
                        image_format=pair.image_format,
                        meta=meta,
                    )
                )
        write_pair_table(self.path / "negatives.parquet", out)
        info = {
            "seed": seed,
            "kinds": list(generator.kinds),
            "from_pairs": len(pairs),
            "negatives": len(out),
            "per_kind": dict(Counter(p.meta["corruption"] for p in out)),
        }
        for stale in ("rewrites.parquet", "rewrite_targets.parquet"):  # made from other pairs or settings
            (self.path / stale).unlink(missing_ok=True)
        if rewrites:
            rows = make_rewrites(pairs, generator)
            atomic_write_parquet(pa.Table.from_pylist(rows, schema=REWRITE_SCHEMA), self.path / "rewrites.parquet")
            info["rewrites"] = {"samples": len(rows), "per_kind": dict(Counter(row["kind"] for row in rows))}
        self.record("negatives", info)
        return info

    def client(self, client_options: ClientOptions, cache: bool = True) -> ChatClient:
        return ChatClient(client_options, cache=RequestCache(self.cache_path) if cache else None)

    def label(
        self, options: LabelOptions, client_options: ClientOptions, cache: bool = True, relabel: bool = False
    ) -> dict[str, Any]:
        """Label every pair table of the folder (the ``teach_label`` stage of ``DIR/run``) into
        ``labels.parquet``, then ask for the teacher's rewrites of the poor captions (the ``teach_rewrite``
        stage) into ``rewrite_targets.parquet``. Shards already done are skipped; a shard whose table holds
        errors a new request may fix is redone. Stages made with other settings or from other pairs are
        refused, or with ``relabel`` done again (answers already in the cache cost nothing)."""
        inputs = [str(self.require("sample.parquet", "sample"))]
        if (self.path / "negatives.parquet").exists():
            inputs.append(str(self.path / "negatives.parquet"))
        cache_path = str(self.cache_path) if cache else None
        stage = TeachLabelStage(TeachLabelOptions(label=options, client=client_options, cache=cache_path))
        try:
            summary, stats = self._run(stage, inputs, relabel, "labelling")
        except Interrupted:  # the finished tables become the labels, marked interrupted: balance and export
            outcome = self._write_labels(stage)  # refuse them unless --allow-incomplete
            self.record("label", {**self._label_info(stage, client_options, inputs, outcome), "interrupted": True})
            raise
        outcome = self._write_labels(stage)
        info = {
            **self._label_info(stage, client_options, inputs, outcome),
            "stats": _request_counts(stats),
            "shards_skipped": list(summary.shards_skipped),
        }
        try:
            rewrites = self._rewrite(options, client_options, cache_path, relabel)
        except Interrupted:
            self.record("label", {**info, "interrupted": True})
            raise
        if rewrites is not None:  # the teacher's rewrites count in the run's totals too
            rewrites, rewrite_stats = rewrites
            info["stats"] = _request_counts(stats + rewrite_stats)
        if rewrites is not None:
            info["rewrites"] = rewrites
        # this invocation's requests are `stats`; `total` adds every earlier run's (this one included)
        info["total"] = _add_counts(self.manifest().get("label"), info["stats"])
        self.record("label", info)
        return info

    def _write_labels(self, stage: TeachLabelStage) -> ShardStats:
        """``labels.parquet`` from the finished shards of the label stage; its rows, ok and errors."""
        reader = self._reader()
        if reader is not None and stage.name in reader.stages() and reader.table_files(stage.name):
            table = self._gather(stage.name, LABEL_SCHEMA)
        else:
            table = LABEL_SCHEMA.empty_table()
        atomic_write_parquet(table, self.path / "labels.parquet")
        return _outcome(table)

    def _label_info(
        self, stage: TeachLabelStage, client_options: ClientOptions, inputs: list[str], outcome: ShardStats
    ) -> dict[str, Any]:
        api_key_source = resolve_api_key(client_options.api_key_env, client_options.api_key_file).source
        return {
            **stage.requests.identity(),
            "client": client_options.describe(),
            "api_key_source": api_key_source,
            "stage": stage.name,
            "run": str(self.run_path),
            "pairs_tables": inputs,
            "rows": outcome.rows,
            "ok": outcome.ok,
            "errors": dict(outcome.errors),
        }

    def rewrite_rows(self) -> list[dict[str, Any]] | None:
        path = self.path / "rewrites.parquet"
        return pq.read_table(path).to_pylist() if path.exists() else None

    def _rewrite(
        self, options: LabelOptions, client_options: ClientOptions, cache_path: str | None, relabel: bool
    ) -> tuple[dict[str, Any], ShardStats] | None:
        """The teacher's rewrites of the poor captions -> ``rewrite_targets.parquet`` (every row, errors too);
        the step's report and what its requests counted."""
        from mlmfilter.teach.rewrites import REWRITE_SCHEMA

        planned = self.path / "rewrites.parquet"
        if not planned.exists():
            return None
        pairs = str(self.require("sample.parquet", "sample"))
        stage = TeachRewriteStage(
            TeachRewriteOptions(label=options, client=client_options, cache=cache_path, pairs=pairs)
        )
        summary, stats = self._run(stage, [str(planned)], relabel, "the teacher's rewrites")
        table = self._gather(stage.name, REWRITE_SCHEMA)
        atomic_write_parquet(table, self.path / "rewrite_targets.parquet")
        outcome = _outcome(table)
        info = {
            "samples": outcome.rows,
            "ok": outcome.ok,
            "errors": dict(outcome.errors),
            "stats": _request_counts(stats),
            "stage": stage.name,
            "shards_skipped": list(summary.shards_skipped),
        }
        return info, stats

    # -- the run of the teacher's requests ----------------------------------------------------------
    def _run(self, stage: TeacherStage, inputs: list[str], relabel: bool, work: str) -> tuple[StageSummary, ShardStats]:
        """Run a teacher stage over ``inputs``: its last summary, and what this invocation's requests counted.

        A table holding errors that a new request may fix (found before this run) is redone after the
        run layer checked the settings and the inputs, so a redo never hides a change of either."""
        retry = not relabel and self._has_retryable_errors(stage.name)
        summary = self._run_once(stage, inputs, "stage" if relabel else False, work)
        stats = self._requests(stage.name, summary)
        if retry:  # every answer the cache has is free: only the failed requests are asked again
            summary = self._run_once(stage, inputs, "stage", work)
            stats = stats + self._requests(stage.name, summary)
        return summary, stats

    def _run_once(self, stage: TeacherStage, inputs: list[str], overwrite: Overwrite, work: str) -> StageSummary:
        """One run of the stage; a refusal of the run layer becomes one line naming what changed and the flag."""
        try:
            summary = run_stage(self.run_path, stage, sources=expand_inputs(inputs), inputs=inputs, overwrite=overwrite)
        except ConfigMismatch:
            changed = self._changed_settings(stage)
            if not changed:
                raise
            raise ConfigMismatch(
                f"{self.path} was labelled with other settings (changed: {', '.join(changed)}); "
                "pass --relabel to label it again (answers already in the request cache cost nothing)"
            ) from None
        except SourceChanged:
            names = ", ".join(Path(i).name for i in inputs)
            raise SourceChanged(
                f"{self.path}: {names} changed since the last `teach label` (teach sample or teach negatives "
                "ran again); pass --relabel to label it again (answers already in the request cache cost nothing)"
            ) from None
        finally:
            stage.close()
        if summary.interrupted:
            raise self._interrupted(stage, inputs)
        if summary.shards_failed:
            failures = "; ".join(f"shard {shard}: {error}" for shard, error in summary.shards_failed.items())
            raise TeachRunFailed(
                f"{work} failed ({failures}); the shards done are kept and every answer received is in the "
                "request cache: re-run the same command to resume"
            )
        return summary

    def _interrupted(self, stage: TeacherStage, inputs: list[str]) -> Interrupted:
        """What an interrupted teacher stage did, in its own unit: labels (pairs x metrics) or rewrite samples.
        Done are the rows of finished shards (what ``labels.parquet`` holds now); the answers received for
        the shard in progress are in the request cache, so the re-run does not ask or pay for them again."""
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path in inputs)
        if isinstance(stage, TeachLabelStage):
            unit, total = "labels", rows * len(stage.requests.metrics)
        else:
            unit, total = "rewrite samples", rows
        done = 0
        reader = self._reader()
        if reader is not None and stage.name in reader.stages() and reader.table_files(stage.name):
            errors = reader.dataset(stage.name).to_table(columns=["error"]).column("error").to_pylist()
            done = sum(error not in RETRYABLE for error in errors)
        then = "re-run the same command to resume"
        if stage.answers_in_progress:
            then += f" ({stage.answers_in_progress} more answers received are cached: not asked or paid for twice)"
        return Interrupted(min(done, total), total, unit, then)

    def _reader(self) -> RunReader | None:
        try:
            return RunReader(self.run_path)
        except RunError:  # not labelled yet
            return None

    def _gather(self, stage_name: str, schema: pa.Schema) -> pa.Table:
        """Every finished shard of the stage, as one table of ``schema`` (its columns in that order)."""
        return self._reader().dataset(stage_name).to_table().select(schema.names).cast(schema)

    def _requests(self, stage_name: str, summary: StageSummary) -> ShardStats:
        """What this invocation's shards of the stage counted (the skipped ones were counted before)."""
        reader = self._reader()
        return ShardStats.total(reader.shard_stats(s, stage_name) or ShardStats() for s in summary.shards_completed)

    def _has_retryable_errors(self, stage_name: str) -> bool:
        reader = self._reader()
        if reader is None or stage_name not in reader.stages() or not reader.table_files(stage_name):
            return False
        errors = reader.dataset(stage_name).to_table(columns=["error"]).column("error").to_pylist()
        return bool(RETRYABLE & set(errors))

    def _changed_settings(self, stage: TeacherStage) -> list[str]:
        """The settings that differ from the stage's earlier run, by their own names (``metrics``)."""
        reader = self._reader()
        before = (reader.settings(stage.name) if reader is not None else {}).get("identity") or {}
        now = json.loads(json.dumps(stage.identity()))  # as stage.yaml holds it: lists, not tuples
        changed: list[str] = []
        for key in sorted(set(before) | set(now)):
            old, new = before.get(key), now.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                changed += [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
            elif old != new:
                changed.append(key)
        return list(dict.fromkeys(changed))

    def write_batch(
        self,
        options: LabelOptions,
        client: ChatClient,
        path: str | Path | None = None,
        max_requests: int | None = None,
        max_bytes: int | None = None,
    ) -> list[Path]:
        """Batch API files holding every request whose answer is not cached yet. A Batch API file takes one
        model, so the describer's requests (text mode) go to files of their own, ``<stem>-<model>-NNNNN``."""
        labeler = Labeler(options, client)
        limits = {k: v for k, v in (("max_requests", max_requests), ("max_bytes", max_bytes)) if v is not None}
        path = local_path(path, "--batch-file") if path else self.path / "batch" / "requests.jsonl"
        writers: dict[str, BatchFileWriter] = {}
        try:
            requests = labeler.plan(self.pairs())
            rewrites = self.rewrite_rows()
            if rewrites is not None:
                from mlmfilter.teach.rewrites import Rewriter

                pairs = {p.uid: p for p in self.sampled()}
                requests = itertools.chain(requests, Rewriter(options, client).plan(rewrites, pairs))
            for request in requests:
                if client.cache is not None and request.key in client.cache:
                    continue
                model = str(request.body.get("model", ""))
                if model not in writers:
                    own = path if model == options.model else path.with_name(f"{path.stem}-{_slug(model)}{path.suffix}")
                    writers[model] = BatchFileWriter(own, **limits)
                writers[model].add(request)  # a writer skips a request already written (one image's description)
        finally:
            for writer in writers.values():
                writer.close()
        return [f for writer in writers.values() for f in writer.files]

    def collect(self, outputs: Sequence[str | Path]) -> dict[str, Any]:
        outputs = [local_path(output, "a Batch API output file") for output in outputs]
        cache = RequestCache(self.cache_path)
        try:
            return ingest_batch_output(outputs, cache).as_dict()
        finally:
            cache.close()

    def label_gaps(self) -> dict[str, Any]:
        """How completely the pairs are labelled: ``expected`` labels (every pair of ``sample.parquet`` and
        ``negatives.parquet`` times every metric), ``missing`` (no row yet: an interrupted or unfinished
        ``label``; or an error a new request may fix), ``by_table`` and ``by_reason`` of the missing ones."""
        labels = pq.read_table(self.require("labels.parquet", "label"), columns=["uid", "metric", "error"])
        metrics = set(labels.column("metric").to_pylist())
        recorded = ((self.manifest().get("label") or {}).get("options") or {}).get("metrics")
        if recorded:
            metrics |= {short_name(m) for m in resolve_metrics(recorded)}
        have = {
            (uid, metric): error
            for uid, metric, error in zip(*(labels.column(c).to_pylist() for c in ("uid", "metric", "error")))
        }
        by_table: Counter = Counter()
        by_reason: Counter = Counter()
        expected = 0
        for name in ("sample.parquet", "negatives.parquet"):
            path = self.path / name
            if not path.exists():
                continue
            for uid in pq.read_table(path, columns=["uid"]).column("uid").to_pylist():
                for metric in metrics:
                    expected += 1
                    key = (uid, metric)
                    reason = "not labelled yet" if key not in have else have[key]
                    if key not in have or reason in RETRYABLE:
                        by_table[name] += 1
                        by_reason[reason] += 1
        return {
            "expected": expected,
            "missing": sum(by_table.values()),
            "by_table": dict(by_table),
            "by_reason": dict(by_reason),
        }

    def require_complete_labels(self, allow_incomplete: bool, step: str) -> dict[str, Any] | None:
        """Refuse to ``step`` (balance, export) from an incompletely labelled folder unless ``allow_incomplete``:
        an interrupted ``label`` would leave, say, the real pairs unlabelled and their negatives labelled,
        and the instruction set would teach from the corruptions alone. Returns the gaps when there are any."""
        gaps = self.label_gaps()
        if not gaps["missing"]:
            return None
        if not allow_incomplete:
            tables = ", ".join(f"{name}: {n}" for name, n in gaps["by_table"].items())
            reasons = ", ".join(f"{reason}: {n}" for reason, n in gaps["by_reason"].items())
            raise IncompleteLabels(
                f"{self.path} is labelled incompletely: {gaps['missing']} of {gaps['expected']} labels are missing "
                f"({tables}; {reasons}). Run `mlmfilter teach label` again to finish (answers already received "
                f"are cached), or pass --allow-incomplete to {step} the labels there are"
            )
        return gaps

    def balance(self, options: BalanceOptions, allow_incomplete: bool = False) -> dict[str, Any]:
        gaps = self.require_complete_labels(allow_incomplete, "balance")
        kept, report = balance(self.labels(), options)
        if gaps is not None:
            report["incomplete_labels"] = gaps
        schema = LABEL_SCHEMA.append(pa.field("bin", pa.int16()))
        atomic_write_parquet(pa.Table.from_pylist(kept, schema=schema), self.path / "balanced.parquet")
        atomic_write_json(self.path / "balance.json", report)
        self.record("balance", report)
        return report

    def export(
        self, out_dir: str | Path, options: ExportOptions, balanced: bool = True, allow_incomplete: bool = False
    ) -> dict[str, Any]:
        manifest = self.manifest()
        if "label" not in manifest:
            raise FileNotFoundError(f"{self.path} has no labels: run `mlmfilter teach label` first")
        gaps = self.require_complete_labels(allow_incomplete, "export")
        label_options = LabelOptions(**manifest["label"]["options"])
        name = "balanced.parquet" if balanced else "labels.parquet"
        labels = self.labels(name)
        pairs = {p.uid: p for p in self.pairs()}
        card = {step: manifest[step] for step in ("sample", "negatives", "label", "balance") if step in manifest}
        card["label"] = {**card["label"], "prompt_texts": _prompt_texts(label_options)}
        if gaps is not None:  # exported although told the labels are incomplete: the card says so
            card["label"]["incomplete_labels"] = gaps
        rewrites = self._rewrite_targets() if options.rewrites else None
        if rewrites is not None:
            from mlmfilter.teach.rewrites import rewrite_prompts

            card["label"]["prompt_texts"]["rewrite"] = rewrite_prompts(label_options).rewrite
        card = _without_local_paths(card, self.path)  # a card is shared: no /home/<user>/... in it
        summary = export(labels, pairs, out_dir, TeacherRequests(label_options), options, card, rewrites=rewrites)
        if gaps is not None:
            summary["incomplete_labels"] = gaps
        self.record("export", {"out": str(out_dir), "labels": name, **summary, "options": options.model_dump()})
        return summary

    def _rewrite_targets(self) -> list[dict[str, Any]] | None:
        planned = self.rewrite_rows()
        if planned is None:
            return None
        path = self.path / "rewrite_targets.parquet"
        targets = pq.read_table(path).to_pylist() if path.exists() else None
        if targets is None or [r["uid"] for r in targets] != [r["uid"] for r in planned]:
            raise FileNotFoundError(
                f"{path} is missing or older than rewrites.parquet: run `mlmfilter teach label` again"
            )
        return targets


def _outcome(table: pa.Table) -> ShardStats:
    """The table's rows, ok and errors by reason."""
    stats = ShardStats()
    stats.add_rows(table.column("error").to_pylist())
    return stats


def _without_local_paths(value: Any, folder: Path) -> Any:
    """The card with each absolute local path written as the teach folder's (``sample.parquet``,
    ``run``) or, outside it, as its file name alone: the card says which file, not whose machine."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item, folder) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item, folder) for item in value]
    if isinstance(value, str) and "://" not in value and len(value) < 4096 and os.path.isabs(value):
        path = Path(value)
        try:
            return path.relative_to(folder.resolve()).as_posix() or "."
        except ValueError:
            try:
                return path.relative_to(folder.absolute()).as_posix() or "."
            except ValueError:
                return path.name
    return value


def _request_counts(stats: ShardStats) -> dict[str, int]:
    return {name: int(stats.counters.get(name, 0)) for name in REQUEST_COUNTERS}


def _add_counts(previous: dict[str, Any] | None, this_run: dict[str, int]) -> dict[str, int]:
    """The requests of every `teach label` of the folder: the earlier runs' total (a record from before
    totals were kept: its one run's counts) plus this run's. A run that sends nothing keeps the total."""
    before = (previous or {}).get("total") or (previous or {}).get("stats") or {}
    return {name: int(before.get(name, 0)) + count for name, count in this_run.items()}


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.rsplit("/", 1)[-1]) or "model"


def _prompt_texts(options: LabelOptions) -> dict[str, str]:
    requests = TeacherRequests(options)
    texts = {"template": requests.template.text, **{m: requests.template.criteria[m] for m in requests.metrics}}
    if options.mode == "text":
        texts["describe_prompt"] = options.describe_prompt
        texts["text_only_template"] = options.text_only_template
    return texts
