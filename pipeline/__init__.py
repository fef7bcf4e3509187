"""dus-pipeline: depth up-scaling (SOLAR-style) of Hugging Face causal LMs.

merge (passthrough / block expansion) -> continued pretraining (DeepSpeed ZeRO) -> SFT (TRL) -> eval.
Every stage is a plain function over typed config dataclasses; Hydra is only the outer layer.
"""

__version__ = "0.1.0"
