"""`mlmfilter train DATA -o OUT --base MODEL`: fine-tune a VLM into an MLM judge (see mlmfilter.training.train)."""

from __future__ import annotations

from typing import Optional

import typer

from mlmfilter.cli.common import console, options_or_exit, setup_logging, user_errors


def train(
    data: list[str] = typer.Argument(
        ..., help="Instruction data: LLaVA conversation JSON and/or TRL prompt-completion JSONL."
    ),
    output: str = typer.Option(
        ..., "--output", "-o", help="Folder for checkpoints and the trained judge (rerun to resume)."
    ),
    base: str = typer.Option(..., help="Base model: a transformers LLaVA / Qwen2-VL / Idefics3 folder or hub id."),
    method: str = typer.Option("lora", help="lora (PEFT) or full."),
    conversation: Optional[str] = typer.Option(
        None, help="Request format to train on (default: the base's recorded one, else auto)."
    ),
    template: str = typer.Option(
        "auto", help="auto (identify v2/v1 in the data) or the custom template the data was built with."
    ),
    freeze_vision: bool = typer.Option(
        True, "--freeze-vision/--train-vision", help="Keep the vision tower fixed (MLM-Filter: fixed)."
    ),
    freeze_projector: bool = typer.Option(
        False, "--freeze-projector/--train-projector", help="Keep the projector fixed."
    ),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Default: 2e-4 (lora), 2e-5 (full)."),
    epochs: float = typer.Option(2.0, help="Epochs (MLM-Filter: 2)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(4, help="Examples per device step."),
    gradient_accumulation: int = typer.Option(1, help="Device steps per optimizer step."),
    lora_r: int = typer.Option(16, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha."),
    save_steps: int = typer.Option(100, help="Write a checkpoint every this many steps."),
    save: str = typer.Option(
        "merged", help="Final save: merged (a plain checkpoint) or adapter (PEFT files; needs the base)."
    ),
    seed: int = typer.Option(0, help="Seed for shuffling, dropout and LoRA initialisation."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16."),
    image_folder: Optional[str] = typer.Option(
        None, help="Folder image paths are relative to (default: the data file's)."
    ),
    max_length: Optional[int] = typer.Option(
        None, help="Skip examples longer than this many tokens (default: the model's context)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Fine-tune a vision-language model into a judge that `mlmfilter score --scorer mlm --model OUT` loads."""
    from mlmfilter import api
    from mlmfilter.training.train import TrainOptions, require_training_extra

    setup_logging(verbose)
    with user_errors():  # the `train` extra is missing: the message says what to install
        require_training_extra()
    options = options_or_exit(
        TrainOptions,
        base=base,
        method=method,
        conversation=conversation,
        template=template,
        freeze_vision=freeze_vision,
        freeze_projector=freeze_projector,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        save_steps=save_steps,
        save=save,
        seed=seed,
        device=device,
        precision=precision,
        image_folder=image_folder,
        max_length=max_length,
    )
    with user_errors():
        result = api.train(data, output, options)
    resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
    first, last = result.first_loss, result.last_loss
    loss = f"loss {first:.3f} -> {last:.3f}" if first is not None and last is not None else "no step trained now"
    console.print(
        f"trained {result.examples} examples to step {result.global_step}{resumed} in {result.seconds:.0f} s "
        f"({loss}); skipped: {result.skipped or 'none'}"
    )
    console.print(
        f"judge written to {result.output}: mlmfilter score SHARDS -o RUN --scorer mlm --model {result.output}"
    )
