"""The merge as written by the user (MergeConfig or a mergekit YAML), checked and normalized.

Only syntax is checked here (no file but the YAML is read): types, required fields, known keys,
parameter values. Everything that needs a model's config is checked by ``plan``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from pipeline.errors import ConfigError
from pipeline.merge.config import MergeConfig

# mergekit's dtype_from_name accepts these (plus int64, meaningless for weights); "torch." prefix ok.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# Tensor parameters each method reads (mergekit passthrough: only ``scale``).
METHOD_PARAMETERS = {"passthrough": ("scale",), "dus": ("scale",), "block_expansion": ("scale",)}
# Fields that only one method reads: setting them for another method is a mistake worth reporting.
METHOD_ONLY_FIELDS = {"n_layers_removed": "dus", "block_expansion_group_size": "block_expansion"}
# Top-level mergekit keys we read; anything else is refused (mergekit would silently ignore a typo).
_YAML_KEYS = {
    "slices", "models", "merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source",
    "parameters", "chat_template", "n_layers_removed", "block_expansion_group_size",
}
# mergekit keys with no meaning for the methods here: refused with an explanation.
_YAML_UNSUPPORTED = {
    "modules": "multi-module merges are not supported",
    "tokenizer": "the `tokenizer:` section (token remapping/union) is not supported; use tokenizer_source",
}


@dataclass
class SourceSpec:
    model: str
    # None = the model's full depth (mergekit ``models:`` form); resolved by the planner.
    layer_range: Optional[Tuple[int, int]]
    parameters: Dict[str, Any]
    where: str  # e.g. "merge.slices[1].sources[0]" (for error messages)


@dataclass
class SliceSpec:
    sources: List[SourceSpec]
    parameters: Dict[str, Any]
    where: str
    # block_expansion: this slice is an inserted identity layer (reported as ``new_layers``).
    inserted: bool = False


@dataclass
class MergeSpec:
    merge_method: str
    slices: List[SliceSpec]
    where: str  # "merge" or "<file>:"
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    base_model: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)
    chat_template: Optional[str] = None
    n_layers_removed: Optional[int] = None
    block_expansion_group_size: Optional[int] = None
    # The YAML text when read from a file (mergekit writes its config verbatim).
    source_text: Optional[str] = None
    # What the user wrote before a derived method (dus/block_expansion) was expanded into slices.
    derived_from: Optional[Dict[str, Any]] = None

    def at(self, path: str) -> str:
        return f"{self.where} {path}" if self.where.endswith(":") else f"{self.where}.{path}"


def plain(value: Any) -> Any:
    """Dataclasses, OmegaConf containers, tuples -> plain dicts and lists (Hydra may hand us any)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def load_spec(cfg: MergeConfig, *, base_model: Optional[str] = None) -> MergeSpec:
    """Normalize ``cfg`` (or the mergekit YAML it points to); ``model: None`` becomes ``base_model``."""
    if cfg.config_file:
        path = Path(cfg.config_file).expanduser()
        if not path.is_file():
            raise ConfigError("merge.config_file", f"{str(path)!r} does not exist", "fix the path")
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(str(path), f"not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(str(path), "expected a mergekit config (a mapping with slices/merge_method)")
        spec = spec_from_mapping(data, where=f"{path}:", base_model=base_model)
        spec.source_text = text
        return spec
    data = {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}
    data.pop("config_file")
    data.pop("out_shard_size")
    return spec_from_mapping(data, where="merge", base_model=base_model, dataclass_form=True)


def spec_from_mapping(data: Dict[str, Any], *, where: str, base_model: Optional[str] = None,
                      dataclass_form: bool = False) -> MergeSpec:
    at = (lambda p: f"{where} {p}") if where.endswith(":") else (lambda p: f"{where}.{p}")
    if not dataclass_form:
        for key in data:
            if key in _YAML_UNSUPPORTED:
                raise ConfigError(at(key), _YAML_UNSUPPORTED[key], "rewrite the merge with slices")
            if key not in _YAML_KEYS:
                raise ConfigError(at(key), f"unknown key (known: {', '.join(sorted(_YAML_KEYS))})", "fix the typo")
    method = data.get("merge_method") or ("passthrough" if dataclass_form else None)
    if not isinstance(method, str):
        raise ConfigError(at("merge_method"), "missing", "set merge_method: passthrough")
    if method not in METHOD_PARAMETERS:
        raise ConfigError(at("merge_method"), f"unsupported merge method {method!r}",
                          f"use one of {', '.join(METHOD_PARAMETERS)}")
    for name, owner in METHOD_ONLY_FIELDS.items():
        if data.get(name) is not None and method != owner:
            raise ConfigError(at(name), f"only used by merge_method: {owner}, but merge_method is {method!r}",
                              f"remove it or set merge_method: {owner}")

    spec = MergeSpec(merge_method=method, slices=[], where=where)
    spec.base_model = _opt_str(data.get("base_model"), at("base_model"))
    for key in ("dtype", "out_dtype"):
        value = _opt_str(data.get(key), at(key))
        if value is not None:
            value = value.removeprefix("torch.")
            if value not in DTYPE_NAMES:
                raise ConfigError(at(key), f"unsupported dtype {value!r}", f"use one of {', '.join(DTYPE_NAMES)}")
        setattr(spec, key, value)
    spec.tokenizer_source = _opt_str(data.get("tokenizer_source"), at("tokenizer_source"))
    spec.chat_template = _opt_str(data.get("chat_template"), at("chat_template"))
    if spec.chat_template is not None and "{" not in spec.chat_template:
        raise ConfigError(at("chat_template"), f"{spec.chat_template!r} is not a Jinja template; mergekit's named "
                          "templates (chatml, llama3, alpaca, ...) and 'auto' are not bundled here",
                          "paste the template text, or leave it unset to keep the tokenizer source's template")
    allowed = METHOD_PARAMETERS[method]
    spec.parameters = _parameters(data.get("parameters"), at("parameters"), allowed)
    for key in METHOD_ONLY_FIELDS:
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(at(key), f"expected an integer, got {value!r}")
        setattr(spec, key, value)

    slices, models = data.get("slices") or [], data.get("models") or []
    if method != "passthrough":
        if slices or models:
            raise ConfigError(at("slices"), f"merge_method {method} derives the slices from the model depth",
                              "remove slices/models and set base_model (or the pipeline's model.name_or_path)")
        return spec
    if slices and models:
        raise ConfigError(at("models"), "give either slices or models, not both")
    if not slices and not models:
        raise ConfigError(at("slices"), "no slices given (nothing to merge)",
                          "add slices: [{sources: [{model: ..., layer_range: [0, N]}]}]")
    if models:
        # mergekit turns `models:` into one slice over every model's full depth.
        if not isinstance(models, list):
            raise ConfigError(at("models"), "expected a list")
        slices = [{"sources": [dict(m, layer_range=None) if isinstance(m, dict) else m for m in models]}]
    if not isinstance(slices, list):
        raise ConfigError(at("slices"), "expected a list of {sources: [...]} entries")
    for i, s in enumerate(slices):
        s_at = at(f"slices[{i}]")
        if not isinstance(s, dict):
            raise ConfigError(s_at, "expected a mapping with `sources`")
        extra = set(s) - {"sources", "parameters", "base_model", "residual_weight"}
        if extra:
            raise ConfigError(f"{s_at}.{sorted(extra)[0]}", "unknown key (known: sources, parameters)")
        sources = s.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"{s_at}.sources", "missing or empty", "add one source {model, layer_range}")
        if len(sources) != 1:
            raise ConfigError(f"{s_at}.sources", f"passthrough takes exactly one source per slice, got {len(sources)}",
                              "split them into separate slices")
        slice_spec = SliceSpec(sources=[], parameters=_parameters(s.get("parameters"), f"{s_at}.parameters", allowed),
                               where=s_at)
        for j, src in enumerate(sources):
            slice_spec.sources.append(_source(src, f"{s_at}.sources[{j}]", base_model, allowed))
        spec.slices.append(slice_spec)
    return spec


def _source(src: Any, where: str, base_model: Optional[str], allowed: Sequence[str]) -> SourceSpec:
    if not isinstance(src, dict):
        raise ConfigError(where, "expected a mapping {model, layer_range}")
    extra = set(src) - {"model", "layer_range", "parameters"}
    if extra:
        raise ConfigError(f"{where}.{sorted(extra)[0]}", "unknown key (known: model, layer_range, parameters)")
    model = src.get("model")
    if model is None:
        if not base_model:
            raise ConfigError(f"{where}.model", "not set, and no base model was given to stand in for it",
                              "set the model, or model.name_or_path in the pipeline config")
        model = base_model
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}.model", f"expected a directory or hub repo id, got {model!r}")
    rng = src.get("layer_range", [])
    if rng is None and "layer_range" in src:
        layer_range = None  # `models:` form: the full depth
    else:
        if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)):
            raise ConfigError(f"{where}.layer_range", f"expected [start, end) as two integers, got {rng!r}",
                              "e.g. layer_range: [0, 24]")
        start, end = rng
        if start < 0:
            raise ConfigError(f"{where}.layer_range", f"start {start} is negative")
        if end == start:
            raise ConfigError(f"{where}.layer_range", f"[{start}, {end}) is empty (the end is exclusive)",
                              f"use [{start}, {start + 1}] for one layer")
        if end < start:
            raise ConfigError(f"{where}.layer_range", f"[{start}, {end}) is reversed",
                              "give [start, end) with start < end; slices are stacked in list order")
        layer_range = (start, end)
    return SourceSpec(model=model, layer_range=layer_range,
                      parameters=_parameters(src.get("parameters"), f"{where}.parameters", allowed), where=where)


def _opt_str(value: Any, where: str) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value or None
    raise ConfigError(where, f"expected a string, got {value!r}")


def _parameters(params: Any, where: str, allowed: Sequence[str]) -> Dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(where, f"expected a mapping like {{scale: 0.5}}, got {params!r}")
    for name, setting in params.items():
        if name not in allowed:
            raise ConfigError(f"{where}.{name}", f"not a parameter of this merge method (it reads: {', '.join(allowed)})")
        _check_setting(setting, f"{where}.{name}")
    return copy.deepcopy(params)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_setting(setting: Any, where: str) -> None:
    """mergekit ParameterSetting: number | [numbers] (gradient) | {filter, value} | [{filter, value}, ...]."""
    if _is_number(setting):
        return
    conds = [setting] if isinstance(setting, dict) else setting
    if isinstance(conds, list) and conds and all(_is_number(x) for x in conds):
        return
    if isinstance(conds, list) and conds and all(isinstance(c, dict) for c in conds):
        for k, c in enumerate(conds):
            if set(c) - {"filter", "value"} or "value" not in c:
                raise ConfigError(f"{where}[{k}]", f"expected {{filter: ..., value: ...}}, got {c!r}")
            if c.get("filter") is not None and not isinstance(c["filter"], str):
                raise ConfigError(f"{where}[{k}].filter", "expected a string (a substring of tensor names)")
            _check_setting(c["value"], f"{where}[{k}].value")
        return
    raise ConfigError(where, f"expected a number, a list of numbers (gradient) or a list of "
                      f"{{filter, value}} conditions, got {setting!r}")


def evaluate_setting(tensor_name: str, setting: Any, t: float) -> Optional[float]:
    """mergekit ``evaluate_setting``: a gradient is interpolated at ``t`` (position within the
    slice, 0..1); conditions apply the first whose ``filter`` is a substring of the tensor name."""
    if _is_number(setting):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(_is_number(x) for x in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t)
    return None


def resolve_parameter(spec: MergeSpec, name: str, slice_spec: Optional[SliceSpec], model: str,
                      tensor_name: str, t: float) -> Any:
    """mergekit ``ConfigReader.parameter`` precedence: source (matching model) > slice > global."""
    if slice_spec is not None:
        for s in slice_spec.sources:
            if s.model == model and name in s.parameters:
                value = evaluate_setting(tensor_name, s.parameters[name], t)
                if value is not None:
                    return value
        if name in slice_spec.parameters:
            value = evaluate_setting(tensor_name, slice_spec.parameters[name], t)
            if value is not None:
                return value
    if name in spec.parameters:
        return evaluate_setting(tensor_name, spec.parameters[name], t)
    return None


class _FlowListDumper(yaml.SafeDumper):
    """Lists of numbers in flow style (``layer_range: [0, 24]``), like mergekit's dumper."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = bool(data) and all(_is_number(e) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def spec_to_mergekit_yaml(spec: MergeSpec) -> str:
    """The (expanded) merge as a mergekit passthrough config that reproduces it bit for bit."""
    out: Dict[str, Any] = {"slices": []}
    for s in spec.slices:
        entry: Dict[str, Any] = {"sources": []}
        for src in s.sources:
            e: Dict[str, Any] = {"model": src.model, "layer_range": list(src.layer_range)}
            if src.parameters:
                e["parameters"] = src.parameters
            entry["sources"].append(e)
        if s.parameters:
            entry["parameters"] = s.parameters
        out["slices"].append(entry)
    out["merge_method"] = "passthrough"
    for key in ("base_model", "dtype", "out_dtype", "tokenizer_source", "chat_template"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    if spec.parameters:
        out["parameters"] = spec.parameters
    header = ""
    if spec.derived_from:
        desc = ", ".join(f"{k}: {v}" for k, v in spec.derived_from.items())
        header = f"# Generated by dus-pipeline from `{desc}`; mergekit-yaml reproduces it as passthrough.\n"
    return header + yaml.dump(out, Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False)
