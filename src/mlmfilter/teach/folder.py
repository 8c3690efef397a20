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
DIR/balanced.parquet      the labels kept by balancing, with their bin; DIR/balance.json histograms
DIR/cache/requests.sqlite the teacher request cache (answers only: no key, no headers)
DIR/batch/                Batch API request files (``label --batch-file``)
```

Labelling resumes through the request cache: a re-run, or a run after ``--collect``, sends only the
requests whose answers are missing, and the labels table is rewritten whole (atomically). The
teacher's rewrites of the poor captions go through the same client and cache after the labels.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.clients.batch import BatchFileWriter, ingest_batch_output
from mlmfilter.clients.cache import RequestCache
from mlmfilter.clients.chat import ChatClient, ClientOptions
from mlmfilter.clients.credentials import resolve_api_key
from mlmfilter.io.writers import atomic_write_json, atomic_write_parquet
from mlmfilter.teach.balance import BalanceOptions, balance
from mlmfilter.teach.export import ExportOptions, export
from mlmfilter.teach.label import LABEL_SCHEMA, Labeler, LabelOptions, TeacherRequests
from mlmfilter.teach.pairs import TeachPair, negative_uid, read_pairs, write_pairs

STAT_NAMES = ("requests", "answered", "cache_hits", "retries", "prompt_tokens", "completion_tokens")


class TeachFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- files ------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "teach.json"

    @property
    def cache_path(self) -> Path:
        return self.path / "cache" / "requests.sqlite"

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

    def pairs(self) -> list[TeachPair]:
        pairs = read_pairs(self.require("sample.parquet", "sample"))
        negatives = self.path / "negatives.parquet"
        return pairs + (read_pairs(negatives) if negatives.exists() else [])

    def labels(self, name: str = "labels.parquet") -> list[dict[str, Any]]:
        return pq.read_table(self.require(name, "label" if name == "labels.parquet" else "balance")).to_pylist()

    # -- steps ------------------------------------------------------------------------------------
    def sample(self, sources, options, read_options=None) -> dict[str, Any]:
        from mlmfilter.teach.sample import PoolSampler

        sampler = PoolSampler(options, read_options, work_dir=self.path)
        pairs, report = sampler.sample(sources)
        write_pairs(self.path / "sample.parquet", pairs)
        info = {**sampler.identity(), "report": report.as_dict(), "inputs": [s.url for s in sources]}
        self.record("sample", info)
        return info

    def negatives(self, kinds: Sequence[str] | None = None, seed: int = 0, rewrites: bool = True) -> dict[str, Any]:
        """``negatives.parquet`` (labelled like any pair) and, with ``rewrites``, the enhancement task's
        contrastive samples in ``rewrites.parquet`` (their poor-caption targets come from ``label``)."""
        from mlmfilter.teach.negatives import NegativeGenerator
        from mlmfilter.teach.rewrites import REWRITE_SCHEMA, make_rewrites

        generator = NegativeGenerator(seed=seed, kinds=kinds)
        pairs = read_pairs(self.require("sample.parquet", "sample"))
        captions = [p.caption for p in pairs]
        out: list[TeachPair] = []
        for pair in pairs:  # its own caption is never picked as "another pair's"
            for n, neg in enumerate(generator.corrupt(pair.caption, uid=pair.uid, other_captions=captions)):
                out.append(
                    TeachPair(
                        uid=negative_uid(pair.uid, neg.kind, n),
                        shard=pair.shard,
                        key=f"{pair.key}#{neg.kind}",
                        caption=neg.caption,
                        image=pair.image,
                        image_format=pair.image_format,
                        image_uid=pair.image_uid,
                        cluster=pair.cluster,
                        parent_uid=pair.uid,
                        corruption=neg.kind,
                        corruption_detail=neg.detail,
                    )
                )
        write_pairs(self.path / "negatives.parquet", out)
        counts: dict[str, int] = {}
        for p in out:
            counts[p.corruption] = counts.get(p.corruption, 0) + 1
        info = {
            "seed": seed,
            "kinds": list(generator.kinds),
            "from_pairs": len(pairs),
            "negatives": len(out),
            "per_kind": counts,
        }
        for stale in ("rewrites.parquet", "rewrite_targets.parquet"):  # made from other pairs or settings
            (self.path / stale).unlink(missing_ok=True)
        if rewrites:
            rows = make_rewrites(pairs, generator)
            atomic_write_parquet(pa.Table.from_pylist(rows, schema=REWRITE_SCHEMA), self.path / "rewrites.parquet")
            per_kind: dict[str, int] = {}
            for row in rows:
                per_kind[row["kind"]] = per_kind.get(row["kind"], 0) + 1
            info["rewrites"] = {"samples": len(rows), "per_kind": per_kind}
        self.record("negatives", info)
        return info

    def client(self, client_options: ClientOptions, cache: bool = True) -> ChatClient:
        return ChatClient(client_options, cache=RequestCache(self.cache_path) if cache else None)

    @property
    def run_path(self) -> Path:
        return self.path / "run"

    def label(self, options: LabelOptions, client_options: ClientOptions, cache: bool = True) -> dict[str, Any]:
        """Label every pair table of the folder as the ``teach_label`` stage of ``DIR/run``, then gather
        the stage's tables into ``labels.parquet``. A shard is redone when its table holds errors a new
        request may fix, or when the settings or the pair table changed; its cached answers cost nothing."""
        from mlmfilter.io.sources import expand_inputs
        from mlmfilter.runs.folder import ConfigMismatch, SourceChanged
        from mlmfilter.runs.runner import run_stage
        from mlmfilter.teach.stage import TeachLabelOptions, TeachLabelStage

        inputs = [str(self.require("sample.parquet", "sample"))]
        if (self.path / "negatives.parquet").exists():
            inputs.append(str(self.path / "negatives.parquet"))
        stage = TeachLabelStage(
            TeachLabelOptions(label=options, client=client_options, cache=str(self.cache_path) if cache else None)
        )
        try:
            overwrite = "stage" if self._has_retryable_errors(stage.name) else False
            try:
                summary = run_stage(
                    self.run_path, stage, sources=expand_inputs(inputs), inputs=inputs, overwrite=overwrite
                )
            except (
                ConfigMismatch,
                SourceChanged,
            ):  # other settings or re-sampled pairs: relabel (cached answers are free)
                summary = run_stage(
                    self.run_path, stage, sources=expand_inputs(inputs), inputs=inputs, overwrite="stage"
                )
        finally:
            stage.close()
        if summary.shards_failed:
            raise RuntimeError(f"labelling failed for shard(s) {summary.shards_failed}")
        from mlmfilter.runs.read import RunReader

        table = RunReader(str(self.run_path)).dataset(stage.name).to_table()
        rows = table.to_pylist()
        atomic_write_parquet(pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), self.path / "labels.parquet")
        errors: dict[str, int] = {}
        for r in rows:
            if r["error"]:
                errors[r["error"]] = errors.get(r["error"], 0) + 1
        counters: dict[str, float] = {}  # this invocation's shards only (skipped ones were counted before)
        for shard_id in summary.shards_completed:
            shard_stats = json.loads((self.run_path / stage.name / "stats" / f"{shard_id}.json").read_text())
            for name, value in shard_stats.get("counters", {}).items():
                counters[name] = counters.get(name, 0) + value
        stats = {name: int(counters.get(name, 0)) for name in STAT_NAMES}
        rewrites = self._rewrite(options, client_options, cache)
        if rewrites is not None:  # the teacher's rewrites count in the run's totals too
            stats = {name: stats[name] + rewrites["stats"][name] for name in STAT_NAMES}
        api_key_source = resolve_api_key(client_options.api_key_env, client_options.api_key_file).source
        info = {
            **stage.requests.identity(),
            "client": client_options.describe(),
            "api_key_source": api_key_source,
            "stage": stage.name,
            "run": str(self.run_path),
            "pairs_tables": inputs,
            "rows": len(rows),
            "ok": len(rows) - sum(errors.values()),
            "errors": errors,
            "stats": stats,
            "shards_skipped": list(summary.shards_skipped),
        }
        if rewrites is not None:
            info["rewrites"] = rewrites
        self.record("label", info)
        return info

    def rewrite_rows(self) -> list[dict[str, Any]] | None:
        path = self.path / "rewrites.parquet"
        return pq.read_table(path).to_pylist() if path.exists() else None

    def _rewrite(self, options: LabelOptions, client_options: ClientOptions, cache: bool) -> dict[str, Any] | None:
        """The teacher's rewrites of the poor captions -> ``rewrite_targets.parquet`` (every row, errors too)."""
        from mlmfilter.teach.rewrites import REWRITE_SCHEMA, Rewriter

        rows = self.rewrite_rows()
        if rows is None:
            return None
        pairs = {p.uid: p for p in read_pairs(self.require("sample.parquet", "sample"))}
        client = self.client(client_options, cache)
        try:
            filled = Rewriter(options, client).fill(rows, pairs)
            client_stats = client.stats.as_dict()
        finally:
            client.close()
            if client.cache is not None:
                client.cache.close()
        atomic_write_parquet(pa.Table.from_pylist(filled, schema=REWRITE_SCHEMA), self.path / "rewrite_targets.parquet")
        errors: dict[str, int] = {}
        for row in filled:
            if row["error"]:
                errors[row["error"]] = errors.get(row["error"], 0) + 1
        return {
            "samples": len(filled),
            "ok": len(filled) - sum(errors.values()),
            "errors": errors,
            "stats": {name: int(client_stats[name]) for name in STAT_NAMES},
        }

    def _has_retryable_errors(self, stage_name: str) -> bool:
        from mlmfilter.teach.stage import RETRYABLE

        tables = self.run_path / stage_name / "tables"
        if not tables.is_dir():
            return False
        for path in tables.glob("*.parquet"):
            column = pq.read_table(path, columns=["error"]).column("error").to_pylist()
            if RETRYABLE & set(column):
                return True
        return False

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
        path = Path(path or self.path / "batch" / "requests.jsonl")
        writers: dict[str, BatchFileWriter] = {}
        try:
            requests = labeler.plan(self.pairs())
            rewrites = self.rewrite_rows()
            if rewrites is not None:
                from mlmfilter.teach.rewrites import Rewriter

                pairs = {p.uid: p for p in read_pairs(self.require("sample.parquet", "sample"))}
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
        cache = RequestCache(self.cache_path)
        try:
            return ingest_batch_output(outputs, cache).as_dict()
        finally:
            cache.close()

    def balance(self, options: BalanceOptions) -> dict[str, Any]:
        kept, report = balance(self.labels(), options)
        schema = LABEL_SCHEMA.append(pa.field("bin", pa.int16()))
        atomic_write_parquet(pa.Table.from_pylist(kept, schema=schema), self.path / "balanced.parquet")
        atomic_write_json(self.path / "balance.json", report)
        self.record("balance", report)
        return report

    def export(self, out_dir: str | Path, options: ExportOptions, balanced: bool = True) -> dict[str, Any]:
        manifest = self.manifest()
        if "label" not in manifest:
            raise FileNotFoundError(f"{self.path} has no labels: run `mlmfilter teach label` first")
        label_options = LabelOptions(**manifest["label"]["options"])
        name = "balanced.parquet" if balanced else "labels.parquet"
        labels = self.labels(name)
        pairs = {p.uid: p for p in self.pairs()}
        card = {step: manifest[step] for step in ("sample", "negatives", "label", "balance") if step in manifest}
        card["label"] = {**card["label"], "prompt_texts": _prompt_texts(label_options)}
        rewrites = self._rewrite_targets() if options.rewrites else None
        if rewrites is not None:
            from mlmfilter.teach.rewrites import rewrite_prompts

            card["label"]["prompt_texts"]["rewrite"] = rewrite_prompts(label_options).rewrite
        summary = export(labels, pairs, out_dir, TeacherRequests(label_options), options, card, rewrites=rewrites)
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


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.rsplit("/", 1)[-1]) or "model"


def _prompt_texts(options: LabelOptions) -> dict[str, str]:
    requests = TeacherRequests(options)
    texts = {"template": requests.template.text, **{m: requests.template.criteria[m] for m in requests.metrics}}
    if options.mode == "text":
        texts["describe_prompt"] = options.describe_prompt
        texts["text_only_template"] = options.text_only_template
    return texts
