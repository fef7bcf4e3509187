"""Depth merge of causal LMs (mergekit-compatible passthrough, SOLAR ``dus``, LLaMA Pro block expansion).

``validate_merge`` plans and checks everything from config files and safetensors headers;
``run_merge`` then streams the tensor bytes into an atomically renamed output directory.
"""

from pipeline.merge.architectures import ARCHITECTURES, ArchitectureSpec, WeightSpec
from pipeline.merge.config import InputSlice, MergeConfig, OutputSlice
from pipeline.merge.execute import run_merge
from pipeline.merge.plan import LayerSource, ResolvedMerge, TensorOp, plan_layers, to_mergekit_yaml, validate_merge

__all__ = [
    "ARCHITECTURES", "ArchitectureSpec", "WeightSpec", "InputSlice", "MergeConfig", "OutputSlice",
    "LayerSource", "ResolvedMerge", "TensorOp", "plan_layers", "run_merge", "to_mergekit_yaml", "validate_merge",
]
