"""Export teacher labels as instruction data a judge is fine-tuned on.

- ``mlm_filter_instruct.json``: the format of MLM-Filter's released instruction files, a JSON list of LLaVA
  records ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n<prompt>"},
  {"from": "gpt", "value": "<score>\\n<rationale>"}]}``; ``image`` is relative to the export folder
  (LLaVA's ``--image_folder``) and the image files are written there, each image once, original bytes;
- ``train.jsonl``: TRL's conversational prompt-completion format (completion-only loss by default)
  ``{"prompt": [user turn], "completion": [assistant turn], "images": [path]}``;
- the enhancement task's contrastive samples (:mod:`.rewrites`), when the folder has them: the human
  turn is ``<image>\n`` + the enhancer's rewrite prompt for the sample's caption, the answer its target
  (the pair's own caption for an unrelated caption, the teacher's rewrite for a poor one); samples
  whose teacher rewrite is an error row are left out (and counted);
- optionally mixed with a general LLaVA instruction set at ``mix_ratio`` general records per teach
  record (quality + rewrite; the released filters: 46k or 665k general to 4k quality);
- ``card.json`` + ``README.md``: the dataset card, every choice of every step.

The human turn is exactly the judge's request text for that metric (:meth:`TeacherRequests.judge_turn`),
whatever the teacher saw (image or, in text mode, a description): the student sees the image.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.core.locations import local_path
from mlmfilter.core.sample import Sample
from mlmfilter.io.writers import atomic_write, atomic_write_json
from mlmfilter.judge.prompts import SHORT_TO_LONG
from mlmfilter.teach.label import TeacherRequests
from mlmfilter.teach.pairs import image_uid

LLAVA_FILE = "mlm_filter_instruct.json"
TRL_FILE = "train.jsonl"
IMAGE_TOKEN = "<image>"


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_folder: str = "mlm_filter_images"
    mix: str | None = None  # a general instruction set (LLaVA JSON list)
    mix_ratio: float | None = Field(None, ge=0)  # general records per teach record; None: all of them
    rewrites: bool = True  # export the enhancement task's samples when the folder has them
    seed: int = 0


def gpt_value(score: int, rationale: str | None) -> str:
    return f"{score}\n{rationale}" if rationale else str(score)


def llava_record(row: dict[str, Any], pair: Sample, requests: TeacherRequests, image_path: str) -> dict[str, Any]:
    human = requests.judge_turn(SHORT_TO_LONG[row["metric"]], pair.caption)
    return {
        "id": f"{row['uid']}_{row['metric']}",
        "image": image_path,
        "conversations": [
            {"from": "human", "value": human},
            {"from": "gpt", "value": gpt_value(row["score"], row["rationale"])},
        ],
    }


def rewrite_record(row: dict[str, Any], human: str, image_path: str) -> dict[str, Any]:
    return {
        "id": f"{row['uid']}_rewrite",
        "image": image_path,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": row["target"]}],
    }


def trl_record(record: dict[str, Any]) -> dict[str, Any] | None:
    """A LLaVA record as prompt-completion: every turn before the last answer is the prompt."""
    turns = record.get("conversations") or []
    if len(turns) < 2 or turns[-1].get("from") != "gpt":
        return None
    has_image = bool(record.get("image"))

    def message(turn: dict[str, Any], first_user: bool) -> dict[str, Any]:
        role = "user" if turn.get("from") == "human" else "assistant"
        text = str(turn.get("value", ""))
        content: list[dict[str, Any]] = []
        if first_user and has_image:
            content.append({"type": "image"})
            text = text.replace(IMAGE_TOKEN + "\n", "", 1).replace(IMAGE_TOKEN, "", 1)
        content.append({"type": "text", "text": text})
        return {"role": role, "content": content}

    first_human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
    prompt = [message(t, i == first_human) for i, t in enumerate(turns[:-1])]
    out = {"id": record.get("id"), "prompt": prompt, "completion": [message(turns[-1], False)]}
    out["images"] = [record["image"]] if has_image else []
    return out


def export(
    labels: list[dict[str, Any]],
    pairs: dict[str, Sample],
    out_dir: str | Path,
    requests: TeacherRequests,
    options: ExportOptions,
    card: dict[str, Any],
    rewrites: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out = local_path(out_dir, "the export folder", "it holds the images the instruction records name")
    (out / options.image_folder).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    written: set[str] = set()

    def image_of(pair: Sample) -> str:
        owner_uid = image_uid(pair)
        image_owner = pairs.get(owner_uid, pair)
        ext = (image_owner.image_format or "jpg").lower()
        image_path = f"{options.image_folder}/{owner_uid}.{ext}"
        if image_path not in written:
            atomic_write(out / image_path, image_owner.image_bytes)
            written.add(image_path)
        return image_path

    for row in labels:
        if row.get("error") is not None or row.get("score") is None:
            continue
        pair = pairs.get(row["uid"])
        if pair is None or not pair.image_bytes:
            raise ValueError(f"label {row['uid']}/{row['metric']} has no pair with an image in the teach folder")
        records.append(llava_record(row, pair, requests, image_of(pair)))
    quality = len(records)
    rewrite_counts: Counter = Counter()
    rewrite_skipped: Counter = Counter()
    if rewrites:
        from mlmfilter.teach.rewrites import student_turn

        for row in rewrites:
            if row.get("error") is not None or not row.get("target"):
                rewrite_skipped[row.get("error") or "no_target"] += 1
                continue
            pair = pairs.get(row["parent_uid"])
            if pair is None or not pair.image_bytes:
                raise ValueError(f"rewrite sample {row['uid']} has no pair with an image in the teach folder")
            records.append(rewrite_record(row, student_turn(requests.options, row["caption"]), image_of(pair)))
            rewrite_counts[row["kind"]] += 1
    general = _general_records(options, len(records))
    mixed = records + general
    random.Random(options.seed).shuffle(mixed)
    atomic_write(out / LLAVA_FILE, json.dumps(mixed, ensure_ascii=False, indent=1))
    trl_lines = [json.dumps(r, ensure_ascii=False) for r in map(trl_record, mixed) if r is not None]
    atomic_write(out / TRL_FILE, "\n".join(trl_lines) + ("\n" if trl_lines else ""))
    summary = {
        "quality_records": quality,
        "rewrite_records": len(records) - quality,
        "rewrite_per_kind": dict(rewrite_counts),
        "rewrite_skipped": dict(rewrite_skipped),
        "general_records": len(general),
        "images": len(written),
        "records": len(mixed),
        "trl_records": len(trl_lines),
        "files": {"llava": LLAVA_FILE, "trl": TRL_FILE, "images": options.image_folder},
    }
    shown_options = {**options.model_dump(), "mix": Path(options.mix).name if options.mix else None}  # no local path
    full_card = {**card, "export": {"options": shown_options, **summary}}
    atomic_write_json(out / "card.json", full_card)
    atomic_write(out / "README.md", render_card(full_card))
    return summary


def _general_records(options: ExportOptions, quality: int) -> list[dict[str, Any]]:
    if not options.mix:
        return []
    data = json.loads(Path(options.mix).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(r, dict) and "conversations" in r for r in data):
        raise ValueError(f"{options.mix} is not a LLaVA instruction file (a JSON list of records with conversations)")
    if options.mix_ratio is None:
        return list(data)
    n = min(len(data), round(options.mix_ratio * quality))
    return random.Random(options.seed).sample(data, n)


def render_card(card: dict[str, Any]) -> str:
    lines = [
        "# MLM-Filter instruction data",
        "",
        "Built with `mlmfilter teach`. Every choice of every step is below (also in `card.json`).",
        "",
    ]
    for step, content in card.items():
        lines += [
            f"## {step}",
            "",
            "```json",
            json.dumps(content, indent=2, ensure_ascii=False, default=str),
            "```",
            "",
        ]
    return "\n".join(lines)
