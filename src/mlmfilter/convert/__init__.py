"""Every foreign format: released judges in the layouts of the code that trained them, and score dumps.

- :mod:`mlmfilter.convert.detect` - which code saved a checkpoint; ``convert_checkpoint`` (local folder
  or hub id) -> the matching converter (``mlmfilter convert``)
- :mod:`mlmfilter.convert.original` - what the converters share: reading an original checkpoint folder,
  writing and checking the converted one
- :mod:`mlmfilter.convert.llava` - LLaVA-1.5 (haotian-liu/LLaVA) -> llava-hf
- :mod:`mlmfilter.convert.unified` - LLaVA-Unified (Llama-3.x / Qwen2.5, SigLIP, aapool_mlp)
- :mod:`mlmfilter.convert.aitqe` - AITQE ``MMForCausalLM`` -> llava-hf
- :mod:`mlmfilter.convert.dumps` - the released MLM-Filter scripts' score files (``export`` / ``import``)

The converters import torch and transformers; nothing is imported here.
"""
