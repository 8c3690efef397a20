"""The request format a trained judge expects, recorded beside its weights and read back at scoring time.

``mlmfilter train`` writes ``mlmfilter_judge.json`` into the saved model (merged or adapter): the
conversation format, answer prefix, end of answer, prompt template and metrics it was trained on.
The MLM scorer reads it (:func:`apply_recorded_format`) for every option the user did not set, so
``mlmfilter score --scorer mlm --model OUT`` sends the trained request format without flags, and
a flag the user does pass still wins.

:class:`PromptIdentifier` tells which template (v2, v1 or a custom one) and which metric produced a
prompt text, so the trainer can record what its data was built with.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mlmfilter.judge.prompts import METRICS, PromptTemplate

RECORD_FILE = "mlmfilter_judge.json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class TrainedFormat:
    conversation: str
    answer_prefix: str
    end_of_answer: str
    #: "v1", "v2", a custom template string, or None when the data matched no known template
    template: str | None
    metrics: list[str] = field(default_factory=list)  # long names, in METRICS order
    trained: dict[str, Any] = field(default_factory=dict)  # base, method, save, data, steps ...

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RECORD_VERSION, "written_by": "mlmfilter train", **asdict(self)}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / RECORD_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def read_trained_format(model: str) -> TrainedFormat | None:
    """The record of a local model folder (or a hub model already in the local cache); None if absent."""
    path = _record_path(model)
    if path is None:
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format_version") != RECORD_VERSION:
        raise ValueError(
            f"{path}: unknown format_version {data.get('format_version')!r} (this mlmfilter reads {RECORD_VERSION})"
        )
    return TrainedFormat(
        conversation=data["conversation"],
        answer_prefix=data["answer_prefix"],
        end_of_answer=data.get("end_of_answer", ""),
        template=data.get("template"),
        metrics=list(data.get("metrics") or []),
        trained=dict(data.get("trained") or {}),
    )


def recorded_options(model: str, set_by_user: Iterable[str]) -> dict[str, Any]:
    """Scorer option values from the model's record, for the options the user did not set."""
    record = read_trained_format(model)
    if record is None:
        return {}
    given = set(set_by_user)
    values = {
        "conversation": record.conversation,
        "answer_prefix": record.answer_prefix,
        "template": record.template,
        "metrics": ",".join(METRICS[m] for m in record.metrics) if record.metrics else None,
    }
    return {k: v for k, v in values.items() if k not in given and v is not None}


def apply_recorded_format(options: Any) -> Any:
    """MLM scorer options with the model's recorded request format filled in (user-set fields kept)."""
    update = recorded_options(options.model, options.model_fields_set)
    return options.model_validate({**options.model_dump(exclude_unset=True), **update}) if update else options


def _record_path(model: str) -> str | None:
    local = Path(model)
    if local.is_dir():
        path = local / RECORD_FILE
        return str(path) if path.is_file() else None
    if local.exists() or model.count("/") != 1:
        return None
    try:  # a hub id: only what is already cached, never a download
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, RECORD_FILE)
    except Exception:
        return None
    return cached if isinstance(cached, str) else None


# -- which template made this prompt -----------------------------------------------------------------

_CAPTION = "\x00caption\x00"


@dataclass(frozen=True)
class PromptMatch:
    template: str  # "v1", "v2" or "custom"
    metric: str
    caption: str


class PromptIdentifier:
    """Matches prompt texts against templates filled for every metric (the caption is the free part)."""

    def __init__(self, templates: Iterable[PromptTemplate]):
        self.patterns: list[tuple[str, str, re.Pattern]] = []
        for template in templates:
            for metric in METRICS:
                filled = template.render(metric, _CAPTION)
                regex = "(.*)".join(re.escape(part) for part in filled.split(_CAPTION))
                self.patterns.append((template.name, metric, re.compile(regex, re.S)))

    def identify(self, prompt: str) -> PromptMatch | None:
        for name, metric, pattern in self.patterns:
            match = pattern.fullmatch(prompt)
            if match:
                return PromptMatch(name, metric, match.group(1) if match.groups() else "")
        return None
