"""Merge configuration: mirrors mergekit's YAML (``slices`` -> ``sources`` -> ``model``/``layer_range``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class InputSlice:
    """One source of an output slice (mergekit ``InputSliceDefinition``).

    ``layer_range`` is ``[start, end)``, end-exclusive, like mergekit. ``model`` is a local
    directory or a hub repo id; ``None`` means the pipeline's base model (``model.name_or_path``).
    """

    model: Optional[str] = None
    layer_range: List[int] = field(default_factory=list)
    parameters: Optional[Dict[str, Any]] = None


@dataclass
class OutputSlice:
    sources: List[InputSlice] = field(default_factory=list)
    parameters: Optional[Dict[str, Any]] = None


@dataclass
class MergeConfig:
    merge_method: str = "passthrough"
    slices: List[OutputSlice] = field(default_factory=list)
    dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    base_model: Optional[str] = None
    # A mergekit YAML file to read instead of ``slices``/``merge_method``/``dtype`` above.
    config_file: Optional[str] = None
    # Output shard size, mergekit's notation ("5B" = 5e9 bytes, "500M", or an integer).
    out_shard_size: str = "5B"
