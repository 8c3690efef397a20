"""Instruction data for the training tests: real Flickr8k photos, clean captions answered high and
corrupted ones answered low, written in MLM-Filter's LLaVA JSON and TRL prompt-completion JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlmfilter.judge.prompts import resolve_template

METRIC = "caption_text_quality"
HIGH, LOW = "85", "10"


def scrambled(caption: str, seed: int) -> str:
    words = caption.split()
    random.Random(seed).shuffle(words)
    return " ".join(words[: max(2, len(words) // 2)]).lower()


def judge_records(pairs: list[tuple[Path, str]], n: int, template: str = "v2") -> list[dict]:
    """n records (LLaVA JSON): even ones the clean caption -> HIGH, odd ones a scrambled one -> LOW."""
    tpl = resolve_template(template)
    records = []
    for i in range(n):
        image, caption = pairs[i // 2 % len(pairs)]
        text, answer = (caption, HIGH) if i % 2 == 0 else (scrambled(caption, i), LOW)
        records.append(
            {
                "id": f"pair-{i}",
                "image": str(image),
                "conversations": [
                    {"from": "human", "value": "<image>\n" + tpl.render(METRIC, text)},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return records


def write_llava_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_prompt_completion_jsonl(path: Path, records: list[dict], conversational: bool = True) -> Path:
    """The same records as TRL prompt-completion lines (conversational or standard)."""
    lines = []
    for r in records:
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if conversational:
            text = human.split("\n", 1)[1]
            line = {
                "id": r["id"],
                "images": [r["image"]],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": gpt}]}],
            }
        else:
            line = {"id": r["id"], "image": r["image"], "prompt": human, "completion": gpt}
        lines.append(json.dumps(line))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
