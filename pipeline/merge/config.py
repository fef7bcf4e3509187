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
    # passthrough (mergekit) | dus (SOLAR: two slices derived from n_layers_removed)
    # | block_expansion (LLaMA Pro: identity copies inserted every block_expansion_group_size layers)
    merge_method: str = "passthrough"
    slices: List[OutputSlice] = field(default_factory=list)
    # mergekit ``dtype``: tensors are cast to it before ``scale`` is applied (None = keep as stored).
    dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    # mergekit ``base_model``: donor of config.json/tokenizer, and the model of ``dus``/``block_expansion``.
    base_model: Optional[str] = None
    # A mergekit YAML file to read instead of ``slices``/``merge_method``/``dtype`` above.
    config_file: Optional[str] = None
    # Output shard size, mergekit's notation ("5B", "500M", or an integer). Like mergekit it counts
    # parameters (tensor elements), not bytes: "5B" of bfloat16 is 10 GB per shard.
    out_shard_size: str = "5B"
    # mergekit ``out_dtype``: dtype written (None = ``dtype``, or as stored when that is None too).
    out_dtype: Optional[str] = None
    # mergekit top-level ``parameters`` (e.g. ``scale``), the fallback for every slice and source.
    parameters: Optional[Dict[str, Any]] = None
    # mergekit ``chat_template``: a Jinja template text written as chat_template.jinja.
    chat_template: Optional[str] = None
    # dus: depth L -> slices [0, L-n) + [n, L) of the base model (SOLAR: L=32, n=8 -> 48 layers).
    n_layers_removed: Optional[int] = None
    # block_expansion: after every group of k layers, insert a copy of the group's last layer with
    # its attention and MLP output projections zeroed (the model still computes the same function).
    block_expansion_group_size: Optional[int] = None
    # The pipeline's merge=auto (not a mergekit method; pipeline/stages/merge.py): the SOLAR-shaped seam
    # [0, a) + [b, N) to target_layers layers chosen from a layer-similarity analysis of the base
    # model, the auto_top_k best predicted seams (plus SOLAR's own) merged and scored by held-out
    # perplexity on auto_tokens tokens; the winner's slices are merged (docs/analysis.md).
    target_layers: Optional[int] = None
    auto_top_k: int = 3
    auto_tokens: int = 4096
