"""Fine-tune a vision-language model into an MLM judge on exported instruction data.

- :mod:`mlmfilter.training.data` - readers of the two export formats (LLaVA conversation JSON,
  TRL prompt-completion JSONL) -> :class:`~mlmfilter.training.data.TrainingExample`, bad records kept
  as :class:`~mlmfilter.training.data.SkippedRecord` with a reason
- :mod:`mlmfilter.training.collate` - the judge's own request encoding + the answer, labels on the
  answer only, images through the model's processor
- :mod:`mlmfilter.training.train` - the run: LoRA (PEFT) or full, freezing, checkpoints and resume,
  the final save (merged or adapter) with the request format recorded beside it

Nothing here imports torch at module load.
"""
