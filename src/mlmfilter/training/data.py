"""Instruction data -> training examples: MLM-Filter's LLaVA conversation JSON and TRL prompt-completion JSONL.

Both formats carry the same thing for a judge: one image, the user turn (``"<image>\\n" + filled
template``) and the teacher's answer. The reader keeps only the prompt text after the image
placeholder: the conversation format around it is added by the judge's own encoder at collate time,
so training and scoring read the same text. A record that cannot become an example (no image, more
than one turn, no answer, a missing image file) is a :class:`SkippedRecord` with its reason; it never
stops the reader and is never dropped silently.

LLaVA JSON (``mlm_filter_instruct_*.json``; also JSON Lines with one such record a line)::

    {"id": "...", "image": "images/x.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "85 ..."}]}

TRL prompt-completion JSONL, standard or conversational::

    {"prompt": "<image>\\n...", "completion": "85 ...", "images": ["images/x.jpg"]}
    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}],
     "completion": [{"role": "assistant", "content": [{"type": "text", "text": "85 ..."}]}],
     "images": ["images/x.jpg"]}

Image paths are relative to ``image_folder`` (LLaVA's ``--image_folder``), by default the data file's folder.
A folder given as data must hold exactly one ``.json``/``.jsonl`` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

IMAGE_PLACEHOLDER = "<image>"

# skip reasons (stable strings: they are written to OUT/training/skipped.jsonl)
BAD_RECORD = "bad_record"
NO_IMAGE = "no_image"
MISSING_IMAGE_FILE = "missing_image_file"
MULTI_TURN = "multi_turn"
NO_ANSWER = "no_answer"
IMAGE_NOT_FIRST = "image_not_first"
NOT_ENCODABLE = "not_encodable"  # set by the collator's check: too long, unreadable image, ...


@dataclass(frozen=True)
class TrainingExample:
    id: str
    image: Path
    prompt: str  # the user turn after "<image>\n": the filled template, no conversation around it
    answer: str


@dataclass(frozen=True)
class SkippedRecord:
    id: str
    reason: str
    detail: str
    source: str  # "file:line" or "file#index"

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail, "source": self.source}


@dataclass
class InstructionData:
    examples: list[TrainingExample] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.skipped:
            counts[record.reason] = counts.get(record.reason, 0) + 1
        return counts


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_instruction_data(paths: list[str | Path], image_folder: str | Path | None = None) -> InstructionData:
    """Examples from every file (``.json``: LLaVA list; ``.jsonl``: either format, per line); a folder
    means every ``.json``/``.jsonl`` in it. Raises FileNotFoundError/ValueError for unusable files."""
    data = InstructionData()
    for path in _expand(paths):
        folder = Path(image_folder) if image_folder is not None else path.parent
        data.files.append(str(path))
        for source, index, record in _records(path):
            try:
                data.examples.append(parse_record(record, folder, index))
            except RecordError as exc:
                rid = str(record.get("id", index)) if isinstance(record, dict) else str(index)
                data.skipped.append(SkippedRecord(rid, exc.reason, str(exc), source))
    return data


def parse_record(record: Any, image_folder: Path, index: int | str = 0) -> TrainingExample:
    """One record of either format -> an example, or RecordError(reason, detail)."""
    if isinstance(record, _Unparseable):
        raise RecordError(BAD_RECORD, f"not valid JSON: {record.detail}")
    if not isinstance(record, dict):
        raise RecordError(BAD_RECORD, f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        prompt_value, answer, image = _llava_fields(record)
    elif "prompt" in record and "completion" in record:
        prompt_value, answer, image = _prompt_completion_fields(record)
    else:
        raise RecordError(
            BAD_RECORD, "neither a LLaVA record ('conversations') nor prompt-completion ('prompt', 'completion')"
        )
    if not image:
        raise RecordError(NO_IMAGE, "the record has no image (a judge always sees one)")
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError(NO_ANSWER, "the answer is empty")
    path = Path(image)
    path = path if path.is_absolute() else image_folder / path
    if not path.is_file():
        raise RecordError(MISSING_IMAGE_FILE, f"image file not found: {path}")
    return TrainingExample(str(record.get("id", index)), path, _prompt_after_image(prompt_value), answer)


def _llava_fields(record: dict) -> tuple[str, str, str | None]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RecordError(BAD_RECORD, "'conversations' must be a list of {from, value} objects")
    if len(turns) != 2:
        raise RecordError(MULTI_TURN, f"{len(turns)} turns: a judge example is one human turn and one gpt turn")
    human, gpt = turns
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise RecordError(BAD_RECORD, f"turns are {human.get('from')!r}, {gpt.get('from')!r}; expected 'human', 'gpt'")
    image = record.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise RecordError(BAD_RECORD, f"{len(image)} images: a judge example has exactly one")
        image = image[0]
    return str(human.get("value", "")), gpt.get("value", ""), image


def _prompt_completion_fields(record: dict) -> tuple[str, str, str | None]:
    images = record.get("images", record.get("image"))
    if isinstance(images, list):
        if len(images) != 1:
            raise RecordError(
                NO_IMAGE if not images else BAD_RECORD, f"{len(images)} images: a judge example has exactly one"
            )
        images = images[0]
    if isinstance(images, dict):  # a datasets Image feature exported as {"path": ...}
        images = images.get("path")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) != 1 or len(prompt) != 1:
            raise RecordError(MULTI_TURN, f"{len(prompt)} prompt messages: a judge example has one user message")
        prompt = _message_with_image(users[0]["content"])
    completion = record["completion"]
    if isinstance(completion, list):
        if len(completion) != 1 or not isinstance(completion[0], dict) or completion[0].get("role") != "assistant":
            raise RecordError(MULTI_TURN, "the completion must be one assistant message")
        completion = _message_text(completion[0].get("content"))
    return str(prompt), completion, images


def _message_with_image(content: Any) -> str:
    """A conversational user message -> "<image>\\n" + its text, when the image part comes first."""
    if isinstance(content, str):
        return content
    parts = [p for p in content if isinstance(p, dict)]
    kinds = [p.get("type") for p in parts]
    if kinds.count("image") != 1:
        raise RecordError(
            NO_IMAGE if "image" not in kinds else BAD_RECORD, f"{kinds.count('image')} image parts in the prompt"
        )
    if kinds[0] != "image":
        raise RecordError(IMAGE_NOT_FIRST, "the image must come before the text (the judge's request order)")
    return IMAGE_PLACEHOLDER + "\n" + _message_text(parts[1:])


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")


def _prompt_after_image(value: str) -> str:
    """``"<image>\\n" + prompt`` -> prompt (the judge's user turn, reference step 1, in reverse)."""
    if value.count(IMAGE_PLACEHOLDER) != 1:
        raise RecordError(
            NO_IMAGE if IMAGE_PLACEHOLDER not in value else BAD_RECORD,
            f"{value.count(IMAGE_PLACEHOLDER)} '<image>' placeholders in the human turn",
        )
    if not value.startswith(IMAGE_PLACEHOLDER + "\n"):
        raise RecordError(IMAGE_NOT_FIRST, "the human turn must start with '<image>\\n' (the judge's request order)")
    prompt = value[len(IMAGE_PLACEHOLDER) + 1 :]
    if not prompt.strip():
        raise RecordError(BAD_RECORD, "the human turn has no text after the image")
    return prompt


def _expand(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            # an export folder may hold the same data in both formats: reading both would count it twice
            found = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and not p.name.startswith("."))
            if len(found) != 1:
                names = ", ".join(p.name for p in found) or "none"
                raise ValueError(f"{path} holds {len(found)} .json/.jsonl files ({names}): name the instruction file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"instruction data not found: {path}")
    return files


def _records(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:  # a binary file given by mistake
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): instruction data is LLaVA JSON or JSONL"
        ) from None
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:  # a hostile file nested thousands deep
            raise ValueError(f"{path}: not valid instruction data (it nests too deeply)") from None
        for i, item in enumerate(items):
            yield f"{path.name}#{i}", i, item
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            item = _Unparseable(str(exc))
        except RecursionError:  # one hostile line: a bad record, the others still count
            item = _Unparseable("nested too deeply")
        yield f"{path.name}:{n}", n - 1, item


class _Unparseable:
    """A JSONL line that does not parse: becomes a bad_record skip, the other lines still count."""

    def __init__(self, detail: str):
        self.detail = detail
