"""dus-pipeline: depth up-scaling (SOLAR-style) of Hugging Face causal LMs.

merge (passthrough / block expansion) -> continued pretraining (DeepSpeed ZeRO) -> SFT (TRL) -> eval.
Every stage is a plain function over typed config dataclasses; Hydra is only the outer layer.
"""

from pipeline.log import quiet_library_bars_off_terminal

__version__ = "0.1.0"

# Before torch, transformers, datasets or tqdm load: their bars in a file are one huge line.
quiet_library_bars_off_terminal()
