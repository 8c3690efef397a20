"""Fine-tune a vision-language model into an MLM judge: ``train(data, out, TrainOptions(base=...))``.

The run, in order:

1. read the instruction data (:mod:`~mlmfilter.training.data`); records that cannot be examples are
   kept in ``OUT/training/skipped.jsonl`` with their reason;
2. load the base through the judge's loader (:func:`mlmfilter.models.vlm.load_vlm`), in fp32 for
   training; encode every example once through the judge's own request encoder
   (:mod:`~mlmfilter.training.collate`) and skip those that cannot be encoded;
3. freeze the vision tower and/or the projector (MLM-Filter: vision frozen); LoRA (PEFT) on the
   language model's linear layers with an unfrozen projector / vision tower trained fully, or a full
   fine-tune of everything not frozen;
4. train with TRL's ``SFTTrainer`` (loss on the answer tokens only: the collator masks the prompt);
   checkpoints in ``OUT/checkpoints``; a rerun of the same command resumes from the last complete
   checkpoint (one whose ``trainer_state.json``, written last, parses), a rerun with other settings
   is refused;
5. save the final model into ``OUT`` merged (a plain checkpoint of the base's architecture) or as an
   adapter (PEFT files naming the base; transformers loads base + adapter from the folder when peft
   is installed), with the processor and
   ``mlmfilter_judge.json``: the conversation format, answer prefix, template and metrics it was
   trained on, which the MLM scorer reads so that ``--model OUT`` needs no format flags.

Why TRL's trainer with our own collator rather than TRL's VLM collator: that collator renders the
chat template of the processor, but a judge must be trained on the exact request it is later sent,
which for the reference formats (Vicuna v1, Llama-3, Qwen, ...) is not the processor's template and is
tokenized the LLaVA way (chunks around the image token encoded apart). The judge's encoder is the
one source of that text; TRL is given the finished ``input_ids``/``labels`` (``skip_prepare_dataset``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlmfilter.core.errors import Interrupted
from mlmfilter.core.ids import fingerprint_of
from mlmfilter.judge.conversations import validate_conversation
from mlmfilter.judge.prompts import METRICS
from mlmfilter.judge.trained_format import PromptIdentifier, TrainedFormat, read_trained_format
from mlmfilter.training.data import InstructionData, read_instruction_data

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RECORDS = "training"
INSTALL_HINT = "training needs the `train` extra: pip install 'mlmfilter[train]' (trl, peft, accelerate)"

#: where each family keeps its vision tower and projector (attribute paths under the model)
VISION_TOWER = {"llava": "model.vision_tower", "qwen2_vl": "model.visual", "idefics3": "model.vision_model"}
PROJECTOR = {"llava": "model.multi_modal_projector", "qwen2_vl": "model.visual.merger", "idefics3": "model.connector"}
LANGUAGE_MODEL = {"llava": "model.language_model", "qwen2_vl": "model.language_model", "idefics3": "model.text_model"}
LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainingExtraMissing(ImportError):
    pass


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    method: Literal["lora", "full"] = "lora"
    #: request format to train on; None: the base's recorded format if it has one, else "auto"
    conversation: str | None = None
    answer_prefix: str | None = None
    #: "auto": identify the template the data was built with (v2, v1); or a custom template string
    template: str = "auto"
    freeze_vision: bool = True
    freeze_projector: bool = False
    #: None: 2e-4 for LoRA, 2e-5 for full (MLM-Filter's full fine-tune)
    learning_rate: float | None = Field(default=None, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    #: stop after this many optimizer steps (overrides epochs); None: run the epochs
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: str = "cosine"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    save_steps: int = Field(default=100, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    save: Literal["merged", "adapter"] = "merged"
    logging_steps: int = Field(default=5, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: "auto": bf16 mixed precision on a GPU that has it, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    max_length: int | None = Field(default=None, gt=0)
    image_folder: str | None = None

    @field_validator("conversation")
    @classmethod
    def _known_conversation(cls, value):
        return None if value is None else validate_conversation(value)

    def resolved_learning_rate(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)

    def fingerprint(self) -> str:
        """What makes two runs the same training (a resume with other values is refused)."""
        payload = self.model_dump(exclude={"save", "device", "logging_steps", "save_total_limit"})
        return fingerprint_of(payload)


@dataclass
class TrainResult:
    output: Path
    global_step: int
    resumed_from: str | None
    examples: int
    skipped: dict[str, int]
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) as logged
    seconds: float = 0.0
    record: TrainedFormat | None = None
    #: (step, mean loss of its batches) of every step this process trained, logged or not
    step_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        """The loss of the first step trained here (measured at every step, whatever logging_steps)."""
        return self.step_losses[0][1] if self.step_losses else (self.losses[0][1] if self.losses else None)

    @property
    def last_loss(self) -> float | None:
        return self.step_losses[-1][1] if self.step_losses else (self.losses[-1][1] if self.losses else None)


def require_training_extra() -> None:
    missing = []
    for module in ("trl", "peft", "accelerate", "datasets"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TrainingExtraMissing(f"{INSTALL_HINT}; missing: {', '.join(missing)}")


def train(data: list[str | Path] | str | Path, output: str | Path, options: TrainOptions) -> TrainResult:
    """Fine-tune ``options.base`` on the instruction data into ``output`` (see the module docstring)."""
    require_training_extra()
    started = time.perf_counter()
    out = Path(output)
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    instructions = read_instruction_data(paths, options.image_folder)
    resume = _check_output(out, options)

    from mlmfilter.models.vlm import inspect_vlm, load_vlm

    spec = inspect_vlm(options.base)
    base_record = read_trained_format(options.base)
    conversation = options.conversation or (base_record.conversation if base_record else "auto")
    answer_prefix = options.answer_prefix
    if answer_prefix is None and base_record and conversation == base_record.conversation:
        answer_prefix = base_record.answer_prefix
    loaded = load_vlm(options.base, device="cpu", dtype="fp32")
    model, processor = loaded.model, loaded.processor

    from mlmfilter.training.collate import JudgeCollator, TrainingEncoder, preflight

    max_length = int(options.max_length or spec.max_positions)
    encoder = TrainingEncoder(processor, spec, conversation, answer_prefix, max_length)
    examples, not_encodable, lengths = preflight(encoder, instructions.examples)
    instructions.skipped.extend(not_encodable)
    _write_skipped(out, instructions)
    if not examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in instructions.skipped_by_reason().items()) or "the data is empty"
        raise ValueError(f"no trainable example in {', '.join(instructions.files)} ({reasons})")
    template, metrics = _identify_template(examples, options.template)
    log.info(
        "%d examples (%d skipped), %d-%d tokens; template %s, metrics %s, conversation %s",
        len(examples),
        len(instructions.skipped),
        min(lengths),
        max(lengths),
        template,
        metrics,
        conversation,
    )

    from transformers import set_seed

    set_seed(options.seed)  # LoRA's initialisation draws from it: the same seed gives the same run
    model.train()
    model = _prepare_parameters(model, spec.family.name, options)
    trainer = _trainer(model, processor, JudgeCollator(encoder, examples), len(examples), out, options)
    _record_start(out, options, resume)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        raise _interrupted(out, trainer.state) from None

    record = TrainedFormat(
        conversation=encoder.conversation,
        answer_prefix=encoder.answer_prefix,
        end_of_answer=encoder.end_text,
        template=template,
        metrics=metrics,
        trained={
            "base": options.base,
            "method": options.method,
            "save": options.save,
            "freeze_vision": options.freeze_vision,
            "freeze_projector": options.freeze_projector,
            "examples": len(examples),
            "global_step": trainer.state.global_step,
            "learning_rate": options.resolved_learning_rate(),
            "data": instructions.files,
        },
    )
    _save_final(trainer.model, processor=processor, out=out, options=options)
    record.write(out)
    losses = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(
        out,
        trainer.state.global_step,
        resume.name if resume else None,
        len(examples),
        instructions.skipped_by_reason(),
        losses,
        time.perf_counter() - started,
        record,
        trainer.step_losses(),
    )
    _write_summary(out, result, trainer)
    return result


def _interrupted(out: Path, state: Any) -> Interrupted:
    """Ctrl-C during training: the steps done and the checkpoint the same command resumes from."""
    last = last_complete_checkpoint(out / CHECKPOINTS)
    if last is not None:
        then = f"re-run the same command to resume from {last.name} (a checkpoint every --save-steps steps)"
    else:
        then = "no checkpoint was written yet (one every --save-steps steps): re-run the same command to start again"
    return Interrupted(int(state.global_step), int(state.max_steps or state.global_step), "steps", then)


# -- the output folder: resume or refuse -------------------------------------------------------------


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step whose trainer_state.json (written last) parses."""
    best: tuple[int, Path] | None = None
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        try:
            step = int(path.name.split("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue  # killed while it was being written
        if best is None or step > best[0]:
            best = (step, path)
    return best[1] if best else None


def _check_output(out: Path, options: TrainOptions) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); refuses a finished or different run."""
    settings = out / RECORDS / "options.json"
    if (out / "mlmfilter_judge.json").exists():
        raise ValueError(f"{out} already holds a trained judge; choose another output folder")
    if settings.exists():
        previous = json.loads(settings.read_text())
        if previous.get("fingerprint") != options.fingerprint():
            raise ValueError(
                f"{out} holds a training run with other settings (see {settings}); "
                "rerun with the same settings to resume, or choose another output folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not an mlmfilter training folder; choose an empty or new folder")
    out.joinpath(RECORDS).mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"fingerprint": options.fingerprint(), "options": options.model_dump()}, indent=2))
    return last_complete_checkpoint(out / CHECKPOINTS)


def _record_start(out: Path, options: TrainOptions, resume: Path | None) -> None:
    step = int(json.loads((resume / "trainer_state.json").read_text())["global_step"]) if resume else 0
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed_from": resume.name if resume else None,
        "start_step": step,
    }
    with open(out / RECORDS / "starts.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def _write_skipped(out: Path, data: InstructionData) -> None:
    path = out / RECORDS / "skipped.jsonl"
    path.write_text("".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in data.skipped), encoding="utf-8")
    for reason, count in data.skipped_by_reason().items():
        log.warning("skipped %d record(s): %s (details in %s)", count, reason, path)


def _write_summary(out: Path, result: TrainResult, trainer: Any) -> None:
    summary = {
        "global_step": result.global_step,
        "resumed_from": result.resumed_from,
        "examples": result.examples,
        "skipped": result.skipped,
        "losses": result.losses,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "seconds_this_process": round(result.seconds, 1),
    }
    (out / RECORDS / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / RECORDS / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))


# -- what the data was built with --------------------------------------------------------------------


def _identify_template(examples, template_option: str) -> tuple[str | None, list[str]]:
    """The template most scoring examples match and the metrics seen; general instruction examples
    (no template matches) are trained on but do not decide the record."""
    from mlmfilter.judge.prompts import resolve_template

    if template_option == "auto":
        identifier = PromptIdentifier([resolve_template("v2"), resolve_template("v1")])
    else:
        identifier = PromptIdentifier([resolve_template(template_option)])
    counts: dict[str, int] = {}
    metrics: set[str] = set()
    for example in examples:
        match = identifier.identify(example.prompt)
        if match is not None:
            counts[match.template] = counts.get(match.template, 0) + 1
            metrics.add(match.metric)
    if not counts:
        if template_option != "auto":
            raise ValueError("no example's prompt matches the given --template: check the template text")
        log.warning("no example matches template v1 or v2: the saved judge records no template (pass --template)")
        return None, []
    if len(counts) > 1:
        log.warning("the data mixes templates %s; recording the most frequent", counts)
    name = max(counts, key=counts.get)
    recorded = template_option if name == "custom" else name
    return recorded, [m for m in METRICS if m in metrics]


# -- model, trainer, saving ---------------------------------------------------------------------------


def _submodule(model: Any, path: str) -> Any:
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _prepare_parameters(model: Any, family: str, options: TrainOptions) -> Any:
    """Freeze what stays fixed; wrap in LoRA (projector fully trained unless frozen) or keep full."""
    vision, projector = VISION_TOWER[family], PROJECTOR[family]
    for p in model.parameters():
        p.requires_grad = True
    if options.freeze_vision:
        for p in _submodule(model, vision).parameters():
            p.requires_grad = False
    # the projector may live inside the vision tower (Qwen2-VL's merger): its own switch decides
    for p in _submodule(model, projector).parameters():
        p.requires_grad = not options.freeze_projector
    if options.method == "full":
        return model

    from peft import LoraConfig, get_peft_model

    # LoRA on the language model; a vision tower or projector that is not frozen is trained fully
    vision_name, projector_name = vision.split(".")[-1], projector.split(".")[-1]
    modules_to_save = [] if options.freeze_vision else [vision_name]
    if not options.freeze_projector and not (projector.startswith(vision + ".") and modules_to_save):
        modules_to_save.append(projector_name)
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=rf".*\.{LANGUAGE_MODEL[family].split('.')[-1]}\..*\.({'|'.join(LORA_LAYERS)})",
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if options.freeze_projector:  # Qwen2-VL's merger sits inside a vision tower that may be trained
        for name, p in peft_model.named_parameters():
            if f".{projector_name}." in name:
                p.requires_grad = False
    peft_model.print_trainable_parameters()
    return peft_model


def _trainer(model: Any, processor: Any, collator: Any, n_examples: int, out: Path, options: TrainOptions):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    use_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    precision = options.precision
    if precision == "auto":
        precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "fp32"
    args = SFTConfig(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=options.resolved_learning_rate(),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        warmup_steps=int(options.warmup_ratio * _total_steps(n_examples, options)),
        weight_decay=options.weight_decay,
        lr_scheduler_type=options.lr_scheduler,
        logging_steps=options.logging_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        data_seed=options.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not use_cuda,
        gradient_checkpointing=options.gradient_checkpointing,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"index": i} for i in range(n_examples)])
    return _judge_sft_trainer(SFTTrainer)(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor
    )


def _judge_sft_trainer(sft_trainer: type) -> type:
    """TRL's SFTTrainer with the model's own loss (labels already masked to the answer).

    TRL's fused LM head (its chunked log-prob kernel, used for the loss and the entropy / token
    accuracy metrics) took 38 of 55 s of 8 CPU steps of a tiny LLaVA in a profile (trl 1.16); the
    model's own cross-entropy over the same labels is the same loss at a fraction of the cost.
    """
    from transformers import Trainer

    class JudgeSFTTrainer(sft_trainer):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            out = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if model.training:  # every batch's loss, kept on its device (no sync per step)
                loss = out[0] if return_outputs else out
                self.__dict__.setdefault("_batch_losses", []).append((self.state.global_step + 1, loss.detach()))
            return out

        def step_losses(self) -> list[tuple[int, float]]:
            """(step, mean loss of its batches) for every step trained in this process. The loss of a
            batch is what the optimizer saw, whatever ``logging_steps`` (a 4-step run logs none at 5)."""
            by_step: dict[int, list[float]] = {}
            for step, loss in self.__dict__.get("_batch_losses", []):
                by_step.setdefault(step, []).append(float(loss))
            return [(step, sum(values) / len(values)) for step, values in sorted(by_step.items())]

    return JudgeSFTTrainer


def _total_steps(n_examples: int, options: TrainOptions) -> int:
    if options.max_steps:
        return options.max_steps
    per_epoch = -(-n_examples // (options.batch_size * options.gradient_accumulation))
    return max(1, int(per_epoch * options.epochs))


def _save_final(model: Any, processor: Any, out: Path, options: TrainOptions) -> None:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if options.save == "adapter":
            # PEFT files naming the base: transformers' from_pretrained(OUT) loads base + adapter
            model.save_pretrained(str(out))
        else:
            model.merge_and_unload().save_pretrained(str(out))
    else:
        model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
