"""Model loading, one loader per family. Submodules import torch/transformers, so import them directly:

- :mod:`mlmfilter.models.common` - device/dtype resolution and provenance helpers shared by backends
- :mod:`mlmfilter.models.clip` - CLIP / SigLIP (Hugging Face) and open_clip dual encoders
"""
