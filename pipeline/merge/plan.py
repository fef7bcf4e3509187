"""Plan a merge: every output tensor, its source bytes, its transform and its place in the output.

``validate_merge`` does all of it from config files and safetensors headers only, so every user
error is raised (as ``ConfigError``) before a single tensor byte is read or written.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pipeline.errors import ConfigError
from pipeline.merge.architectures import LM_HEAD
from pipeline.merge.config import MergeConfig
from pipeline.merge.safetensors_io import (
    DTYPES, TORCH_NAME_TO_CODE, ShardEntry, ShardLayout, TensorInfo, layout_shard, parse_size,
)
from pipeline.merge.sources import (
    METADATA_PATTERNS, SourceModel, load_checkpoint_index, load_source_config, resolve_model_dir,
)
from pipeline.merge.spec import MergeSpec, SliceSpec, SourceSpec, load_spec, resolve_parameter, spec_to_mergekit_yaml

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"

SourceLoader = Callable[[str, str], SourceModel]


@dataclass(frozen=True)
class LayerSource:
    """Output layer <- ``layer`` of ``model``; ``t`` is its position in its slice (0..1, for gradients)."""

    model: str
    layer: int
    slice_index: int
    t: float
    inserted: bool = False


@dataclass
class TensorOp:
    """One output tensor: source bytes -> [cast to compute dtype] -> [* scale] -> [cast] -> output."""

    out_name: str
    source: SourceModel
    src: TensorInfo
    out_dtype: str
    compute_dtype: Optional[str] = None
    scale: Optional[float] = None
    shard: int = -1
    offset: int = 0  # absolute byte offset in the output shard

    @property
    def out_nbytes(self) -> int:
        return self.src.numel * DTYPES[self.out_dtype][0]

    @property
    def is_copy(self) -> bool:
        """Bytes can go straight from source to output (the common, disk-speed case)."""
        return (self.scale is None and self.out_dtype == self.src.dtype
                and self.compute_dtype in (None, self.src.dtype))


@dataclass
class ResolvedMerge:
    """Everything ``run_merge`` needs, checked: the output of ``validate_merge``."""

    spec: MergeSpec
    sources: Dict[str, SourceModel]
    donor: SourceModel
    layer_map: List[LayerSource]
    ops: List[TensorOp]
    shards: List[ShardLayout]
    out_config: Dict[str, Any]
    tokenizer_dir: Optional[Path]
    mergekit_yaml: str
    max_shard_bytes: int
    warnings: List[str] = field(default_factory=list)

    @property
    def new_layers(self) -> List[int]:
        return [i for i, ls in enumerate(self.layer_map) if ls.inserted]

    @property
    def num_parameters(self) -> int:
        return sum(op.src.numel for op in self.ops)

    @property
    def bytes_to_read(self) -> int:
        """Tensor bytes read from the sources: each source tensor once, however often it is used."""
        return sum({(op.source.ref, op.src.name): op.src.nbytes for op in self.ops}.values())

    @property
    def bytes_to_write(self) -> int:
        return sum(s.size for s in self.shards)


def validate_merge(cfg: MergeConfig, *, base_model: Optional[str] = None, allow_pickle: bool = False,
                   trust_remote_code: bool = False) -> ResolvedMerge:
    """Check and plan the whole merge without moving a tensor; ConfigError on any user error."""
    spec = load_spec(cfg, base_model=base_model)
    max_shard_bytes = parse_size(cfg.out_shard_size, "merge.out_shard_size")
    load = _source_cache(trust_remote_code)
    expand_slices(spec, load, base_model=base_model)

    used = _models_in_slices(spec)
    donor_ref = spec.base_model or spec.slices[0].sources[0].model
    donor = load(donor_ref, spec.at("base_model") if spec.base_model else f"{used[donor_ref]}.model")
    sources = {ref: load(ref, f"{where}.model") for ref, where in used.items()}
    _check_compatible(donor, sources, used)
    for ref, src in sources.items():
        load_checkpoint_index(src, f"{used[ref]}.model", allow_pickle=allow_pickle)
        _check_known_tensors(src)

    layer_map = plan_layers(spec)
    ops = plan_tensors(spec, layer_map, sources, donor)
    shards = plan_shards(ops, max_shard_bytes)
    warnings: List[str] = []
    out_config = plan_out_config(spec, donor, layer_map, sources, warnings)
    tokenizer_dir = plan_tokenizer(spec, donor, sources, warnings)
    mergekit_yaml = (spec.source_text if spec.source_text and not spec.derived_from
                     else spec_to_mergekit_yaml(spec))
    return ResolvedMerge(spec=spec, sources=sources, donor=donor, layer_map=layer_map, ops=ops, shards=shards,
                         out_config=out_config, tokenizer_dir=tokenizer_dir, mergekit_yaml=mergekit_yaml,
                         max_shard_bytes=max_shard_bytes, warnings=warnings)


def to_mergekit_yaml(cfg: MergeConfig, *, base_model: Optional[str] = None, trust_remote_code: bool = False) -> str:
    """The merge in mergekit's YAML format (``mergekit-yaml`` reproduces the same tensors).

    A passthrough config read from a YAML file is returned verbatim (as mergekit does); ``dus`` and
    ``block_expansion`` are written as the equivalent passthrough slices, which needs the model's
    depth, so only those read the model's config.json.
    """
    spec = load_spec(cfg, base_model=base_model)
    if spec.source_text and spec.merge_method == "passthrough":
        return spec.source_text
    expand_slices(spec, _source_cache(trust_remote_code), base_model=base_model)
    return spec_to_mergekit_yaml(spec)


# ----------------------------------------------------------------------------------------------
# Slices


def _source_cache(trust_remote_code: bool) -> SourceLoader:
    cache: Dict[str, SourceModel] = {}

    def load(ref: str, where: str) -> SourceModel:
        if ref not in cache:
            cache[ref] = load_source_config(ref, where, trust_remote_code=trust_remote_code)
        return cache[ref]

    return load


def expand_slices(spec: MergeSpec, load: SourceLoader, *, base_model: Optional[str]) -> None:
    """Derive the slices of ``dus``/``block_expansion`` and fill open ranges; check every range."""
    derive = _DERIVED_SLICES.get(spec.merge_method)
    if derive is not None:
        ref = spec.base_model or base_model
        if not ref:
            raise ConfigError(spec.at("base_model"), f"merge_method {spec.merge_method} needs a model to expand",
                              "set base_model (or the pipeline's model.name_or_path)")
        src = load(ref, spec.at("base_model"))
        spec.slices = derive(spec, src)
    for s in spec.slices:
        for source in s.sources:
            depth = load(source.model, f"{source.where}.model").num_layers
            if source.layer_range is None:
                source.layer_range = (0, depth)
            start, end = source.layer_range
            if end > depth:
                raise ConfigError(f"{source.where}.layer_range",
                                  f"[{start}, {end}) lies outside {source.model!r}, which has {depth} layers",
                                  f"keep ranges within [0, {depth}] (the end is exclusive)")


def _dus_slices(spec: MergeSpec, src: SourceModel) -> List[SliceSpec]:
    """SOLAR depth up-scaling: [0, L-n) + [n, L) (L=32, n=8 -> 48 layers)."""
    where, n, depth = spec.at("n_layers_removed"), spec.n_layers_removed, src.num_layers
    if n is None:
        raise ConfigError(where, "required by merge_method dus", "e.g. n_layers_removed: 8 (SOLAR: 32 -> 48 layers)")
    if not 0 <= n < depth:
        raise ConfigError(where, f"{n} is outside [0, {depth}) for {src.ref!r}, which has {depth} layers",
                          f"pick 0 <= n < {depth}; the result has 2*({depth}-n) layers")
    spec.derived_from = {"merge_method": "dus", "n_layers_removed": n}
    return [SliceSpec([SourceSpec(src.ref, rng, {}, where)], {}, where) for rng in ((0, depth - n), (n, depth))]


def _block_expansion_slices(spec: MergeSpec, src: SourceModel) -> List[SliceSpec]:
    """LLaMA Pro: after each full group of k layers, a copy of its last layer whose residual writes
    (attention and MLP output projections) are scaled by 0, so it starts as the identity."""
    where, k, depth = spec.at("block_expansion_group_size"), spec.block_expansion_group_size, src.num_layers
    if k is None:
        raise ConfigError(where, "required by merge_method block_expansion",
                          f"e.g. {max(1, depth // 4)} (one new layer per {max(1, depth // 4)} layers)")
    if not 1 <= k <= depth:
        raise ConfigError(where, f"{k} is outside [1, {depth}] for {src.ref!r}, which has {depth} layers")
    zeroed = {"scale": [{"filter": name, "value": 0.0} for name in src.arch.block_expansion_zeroed]}
    slices: List[SliceSpec] = []
    for start in range(0, depth, k):
        end = min(start + k, depth)
        slices.append(SliceSpec([SourceSpec(src.ref, (start, end), {}, where)], {}, where))
        if end - start == k:  # the reference implementation skips a trailing partial group
            slices.append(SliceSpec([SourceSpec(src.ref, (end - 1, end), {}, where)], copy.deepcopy(zeroed), where,
                                    inserted=True))
    spec.derived_from = {"merge_method": "block_expansion", "block_expansion_group_size": k}
    return slices


_DERIVED_SLICES = {"dus": _dus_slices, "block_expansion": _block_expansion_slices}


def planned_num_layers(cfg: MergeConfig, *, base_layers: int) -> int:
    """The merged depth when every source has ``base_layers`` layers, from the same slice derivation
    the merge follows, without reading any model (preflight, for a base that is not built yet)."""
    from types import SimpleNamespace

    stand_in = SimpleNamespace(ref="base", num_layers=base_layers, arch=SimpleNamespace(block_expansion_zeroed=()))
    spec = load_spec(cfg, base_model="base")
    expand_slices(spec, lambda ref, where: stand_in, base_model="base")
    return len(plan_layers(spec))


def _models_in_slices(spec: MergeSpec) -> Dict[str, str]:
    """Model ref -> where it is first named (for error messages), in slice order."""
    used: Dict[str, str] = {}
    for s in spec.slices:
        for source in s.sources:
            used.setdefault(source.model, source.where)
    return used


def plan_layers(spec: MergeSpec) -> List[LayerSource]:
    """Output layer i -> (model, source layer), slices stacked in order, ranges end-exclusive."""
    layers: List[LayerSource] = []
    for i, s in enumerate(spec.slices):
        source = s.sources[0]
        start, end = source.layer_range
        n = end - start
        for idx in range(n):
            layers.append(LayerSource(source.model, start + idx, i, idx / (n - 1) if n > 1 else 1.0, s.inserted))
    return layers


# ----------------------------------------------------------------------------------------------
# Checks


def _check_compatible(donor: SourceModel, sources: Dict[str, SourceModel], used: Dict[str, str]) -> None:
    for ref, src in sources.items():
        if src is donor:
            continue
        where = f"{used[ref]}.model"
        if src.arch.name != donor.arch.name:
            raise ConfigError(where, f"{ref!r} is a {src.arch.name} but {donor.ref!r} is a {donor.arch.name}; "
                              "layers of different architectures cannot be stacked", "use models of one architecture")
        for key in donor.arch.shape_config_keys:
            a, b = src.config_value(key), donor.config_value(key)
            if a != b:
                raise ConfigError(where, f"{ref!r} has {key}={a!r} but {donor.ref!r} has {key}={b!r}; "
                                  "their layers do not fit together", "merge models with identical shapes")


def _check_known_tensors(src: SourceModel) -> None:
    arch = src.arch
    known = {w.name for w in arch.pre_weights + arch.post_weights}
    known.update(arch.layer_tensor_name(w.name, layer) for layer in range(src.num_layers) for w in arch.layer_weights)
    unknown = sorted(n for n in src.tensors if n not in known and not n.endswith(arch.ignored_tensor_suffixes))
    if unknown:
        raise ConfigError(
            str(src.checkpoint_files[0] if src.checkpoint_files else src.path),
            f"holds {len(unknown)} tensor(s) the {arch.name} layout does not know, e.g. {unknown[:3]} "
            f"(config num_hidden_layers={src.num_layers}); refusing rather than dropping weights",
            "check num_hidden_layers, or extend pipeline/merge/architectures.py for this variant",
        )


# ----------------------------------------------------------------------------------------------
# Tensors and shards


def plan_tensors(spec: MergeSpec, layer_map: List[LayerSource], sources: Dict[str, SourceModel],
                 donor: SourceModel) -> List[TensorOp]:
    """Pre-layer weights from the first slice's model, layers as mapped, final norm and lm_head from
    the last slice's model (mergekit's rule); no lm_head when the embeddings are tied."""
    arch = donor.arch
    ops: List[TensorOp] = []
    first_slice, last_slice = spec.slices[0], spec.slices[-1]
    first, last = sources[first_slice.sources[0].model], sources[last_slice.sources[0].model]

    for w in arch.pre_weights:
        if not (w.optional and w.name not in first.tensors):
            ops.append(_tensor_op(spec, w.name, first, w.name, first_slice, 0.0))

    reference: Optional[tuple] = None
    for out_layer, ls in enumerate(layer_map):
        src = sources[ls.model]
        layer_ops, shapes = [], []
        for w in arch.layer_weights:
            name = arch.layer_tensor_name(w.name, ls.layer)
            if w.optional and name not in src.tensors:
                continue
            op = _tensor_op(spec, arch.layer_tensor_name(w.name, out_layer), src, name,
                            spec.slices[ls.slice_index], ls.t)
            layer_ops.append(op)
            shapes.append((w.name, op.src.shape))
        # Every output layer must have the same tensors and shapes (transformers builds all layers
        # from one config); a frankenmerge of mismatched models is caught here, before any I/O.
        signature = tuple(shapes)
        if reference is None:
            reference = (signature, ls)
        elif signature != reference[0]:
            r = reference[1]
            raise ConfigError(f"{spec.slices[ls.slice_index].sources[0].where}.model",
                              f"layer {ls.layer} of {ls.model!r} has tensors/shapes {_describe(signature)} but layer "
                              f"{r.layer} of {r.model!r} has {_describe(reference[0])}",
                              "merge models with identical layer layouts")
        ops.extend(layer_ops)

    for w in arch.post_weights:
        if w.role == LM_HEAD and donor.tie_word_embeddings:
            continue  # tied: transformers re-ties lm_head to the embeddings on load
        if not (w.optional and w.name not in last.tensors):
            # t = 0 here too: mergekit plans post weights with the module's reader, built at t=0
            ops.append(_tensor_op(spec, w.name, last, w.name, last_slice, 0.0))
    return ops


def _describe(signature: tuple) -> str:
    return "{" + ", ".join(f"{n}: {list(s)}" for n, s in signature) + "}"


def _tensor_op(spec: MergeSpec, out_name: str, src: SourceModel, name: str, slice_spec: SliceSpec,
               t: float) -> TensorOp:
    info = src.tensors.get(name)
    if info is None:
        raise ConfigError(str(src.checkpoint_files[0] if src.checkpoint_files else src.path),
                          f"tensor {name!r} is missing from {src.ref!r} (needed for output {out_name!r})",
                          "re-download the model; a checkpoint without it is incomplete")
    scale = resolve_parameter(spec, "scale", slice_spec, src.ref, name, t)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ConfigError(f"{slice_spec.where}.parameters.scale", f"evaluates to {scale!r} for {name}, not a number")
    floating = DTYPES[info.dtype][2]
    if scale is not None and not floating:
        raise ConfigError(f"{slice_spec.where}.parameters.scale", f"cannot scale {name}, an integer tensor",
                          "narrow the scale with a filter")
    compute = TORCH_NAME_TO_CODE[spec.dtype] if spec.dtype and floating else None
    out = TORCH_NAME_TO_CODE[spec.out_dtype] if spec.out_dtype and floating else (compute or info.dtype)
    return TensorOp(out_name=out_name, source=src, src=info, out_dtype=out, compute_dtype=compute, scale=scale)


def plan_shards(ops: List[TensorOp], max_shard_bytes: int) -> List[ShardLayout]:
    """mergekit's rule (io/tensor_writer.py ``save_tensor``): a new shard starts when adding a
    tensor would pass ``max_shard_bytes`` of tensor data; tensors keep output order."""
    groups: List[List[TensorOp]] = []
    size = 0
    for op in ops:
        if groups and size + op.out_nbytes <= max_shard_bytes:
            groups[-1].append(op)
            size += op.out_nbytes
        else:
            groups.append([op])
            size = op.out_nbytes
    shards = []
    for i, group in enumerate(groups):
        entries = [ShardEntry(op.out_name, op.out_dtype, op.src.shape, op.out_nbytes) for op in group]
        shards.append(layout_shard(SHARD_NAME.format(index=i + 1, total=len(groups)), entries))
        for op, entry in zip(group, entries):
            op.shard, op.offset = i, entry.offset
    return shards


# ----------------------------------------------------------------------------------------------
# config.json and tokenizer


def plan_out_config(spec: MergeSpec, donor: SourceModel, layer_map: List[LayerSource],
                    sources: Dict[str, SourceModel], warnings: List[str]) -> Dict[str, Any]:
    """The donor's config.json with the new depth, every per-layer field sliced like the layers."""
    arch = donor.arch
    cfg = copy.deepcopy(donor.config)
    cfg[arch.num_layers_config_key] = len(layer_map)
    refs = sorted({ls.model for ls in layer_map})

    for key in arch.per_layer_config_keys:
        values = {ref: sources[ref].config_value(key) for ref in refs}
        if all(v is None for v in values.values()):
            continue
        for ref, v in values.items():
            if not isinstance(v, list) or len(v) != sources[ref].num_layers:
                raise ConfigError(str(sources[ref].path / "config.json"),
                                  f"{key} should list one entry per layer ({sources[ref].num_layers}), got {v!r}",
                                  "fix the config")
        cfg[key] = [values[ls.model][ls.layer] for ls in layer_map]

    for key in arch.layer_threshold_config_keys:
        # "layers with index >= value behave differently" (Qwen2 max_window_layers: those may use
        # sliding-window attention). Map each output layer's source index through the threshold of
        # its own model, and express the result as a new threshold where possible.
        thresholds = {ref: sources[ref].config_value(key) for ref in refs}
        if not all(isinstance(v, int) for v in thresholds.values()):
            continue
        beyond = [ls.layer >= thresholds[ls.model] for ls in layer_map]
        lead = beyond.index(True) if True in beyond else len(beyond)
        cfg[key] = lead
        if not all(beyond[lead:]):
            warnings.append(f"{key}: the merged layers are not one contiguous block below/above the threshold; "
                            f"set to {lead}, and layer_types (which transformers >= 4.53 reads) holds the exact "
                            "per-layer attention")

    for key, value in donor.config.items():
        if (isinstance(value, list) and len(value) == donor.num_layers and donor.num_layers > 1
                and key not in arch.per_layer_config_keys):
            warnings.append(f"config key {key!r} has one entry per layer but is not known to be per-layer; "
                            "copied unchanged")

    if "torch_dtype" in cfg:  # transformers 5 reads and writes `dtype`
        cfg.setdefault("dtype", cfg.pop("torch_dtype"))
    if spec.out_dtype or spec.dtype:
        cfg["dtype"] = spec.out_dtype or spec.dtype

    for key in arch.per_layer_config_keys:  # what transformers checks on load (validate_layer_type)
        if key in cfg and len(cfg[key]) != cfg[arch.num_layers_config_key]:
            raise AssertionError(f"{key} has {len(cfg[key])} entries for {cfg[arch.num_layers_config_key]} layers")
    return cfg


def plan_tokenizer(spec: MergeSpec, donor: SourceModel, sources: Dict[str, SourceModel],
                   warnings: List[str]) -> Optional[Path]:
    """Tokenizer donor: ``tokenizer_source`` ("base" = base_model), else the config donor."""
    where = spec.at("tokenizer_source")
    embed_model = sources[spec.slices[0].sources[0].model]
    ts = spec.tokenizer_source
    if ts == "union":
        raise ConfigError(where, "'union' builds a new vocabulary and permutes the embedding rows, which this "
                          "merge does not do", "use a model whose tokenizer matches the embeddings")
    if ts == "base":
        if not spec.base_model:
            raise ConfigError(where, "'base' needs base_model to be set")
        ts = spec.base_model
    tok_dir = resolve_model_dir(ts, where, patterns=METADATA_PATTERNS) if ts else donor.path
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        warnings.append(f"no tokenizer files in {tok_dir}; the merged model has none")
        return tok_dir
    ours = _vocab_fingerprint(embed_model.path)
    if ts and tok_dir != embed_model.path and ours is not None and _vocab_fingerprint(tok_dir) != ours:
        raise ConfigError(where, f"the vocabulary of {ts!r} differs from that of {embed_model.ref!r}, whose embeddings "
                          "the merged model uses (mergekit would permute the embedding rows; this merge does not)",
                          "leave tokenizer_source unset or use a model with the same vocabulary")
    for ref, src in sources.items():
        theirs = _vocab_fingerprint(src.path)
        if ours is not None and theirs is not None and theirs != ours:
            warnings.append(f"{ref!r} has a different vocabulary than {embed_model.ref!r}; its layers are stacked "
                            "anyway (same vocab_size), check that the token ids mean the same thing")
    return tok_dir


def _vocab_fingerprint(model_dir: Path) -> Optional[str]:
    """Hash of token -> id (tokenizer.json vocab + added tokens, or the sentencepiece model file)."""
    h = hashlib.sha256()
    tok_json = model_dir / "tokenizer.json"
    try:
        if tok_json.is_file():
            data = json.loads(tok_json.read_text())
            added = sorted((a.get("id"), a.get("content")) for a in data.get("added_tokens") or [])
            h.update(json.dumps([data.get("model", {}).get("vocab"), added], sort_keys=True).encode())
            return h.hexdigest()
        for name in ("tokenizer.model", "vocab.json", "added_tokens.json"):
            if (model_dir / name).is_file():
                h.update(name.encode() + (model_dir / name).read_bytes())
        return h.hexdigest() if h.digest() != hashlib.sha256().digest() else None
    except (OSError, ValueError, AttributeError):
        return None
