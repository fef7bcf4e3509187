"""Weight layout of each supported architecture, as data (like mergekit's ``_data/architectures``).

The merge never guesses a layout: a checkpoint whose ``config.json`` names an architecture missing
from ``ARCHITECTURES`` is refused, and so is a checkpoint holding a tensor the table does not
account for (dropping it silently would produce a model that loads with random weights).

Each entry lists
- ``pre_weights``: tensors before the first decoder layer (taken from the first slice's model);
- ``layer_weights``: per-layer tensors, relative to ``layer_prefix`` (``{layer}`` = layer index);
- ``post_weights``: tensors after the last layer (taken from the last slice's model);
- ``optional``: layer tensors present only for some configs (e.g. ``attention_bias: true``);
  a layer carries them iff its source checkpoint does;
- ``per_layer_config_keys``: config lists with one entry per decoder layer, sliced with the layers;
- ``layer_threshold_config_keys``: config ints meaning "layers with index >= value behave
  differently" (Qwen2/Qwen3 ``max_window_layers``), re-derived through the layer map;
- ``block_expansion_zeroed``: substrings naming the tensors that write into the residual stream
  (attention output and MLP output projections, weight and bias): zeroing them turns a copied layer
  into an identity (LLaMA Pro block expansion);
- ``shape_config_keys``: config fields that must agree between the models of one merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# The lm_head role is special: it is not written when the output ties it to the embeddings.
EMBED = "embed"
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class WeightSpec:
    name: str
    optional: bool = False
    role: Optional[str] = None


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    model_types: Tuple[str, ...]
    pre_weights: Tuple[WeightSpec, ...]
    layer_weights: Tuple[WeightSpec, ...]
    post_weights: Tuple[WeightSpec, ...]
    layer_prefix: str = "model.layers.{layer}."
    num_layers_config_key: str = "num_hidden_layers"
    per_layer_config_keys: Tuple[str, ...] = ()
    layer_threshold_config_keys: Tuple[str, ...] = ()
    block_expansion_zeroed: Tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # Buffers some old checkpoints carry; recomputed by transformers, never merged.
    ignored_tensor_suffixes: Tuple[str, ...] = ("rotary_emb.inv_freq",)
    shape_config_keys: Tuple[str, ...] = (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "tie_word_embeddings",
    )

    def layer_tensor_name(self, rel_name: str, layer: int) -> str:
        return self.layer_prefix.format(layer=layer) + rel_name


def _w(name: str, optional: bool = False, role: Optional[str] = None) -> WeightSpec:
    return WeightSpec(name=name, optional=optional, role=role)


def _layer(*names: str, optional: Tuple[str, ...] = ()) -> Tuple[WeightSpec, ...]:
    return tuple(_w(n) for n in names) + tuple(_w(n, optional=True) for n in optional)


_EMBED = (_w("model.embed_tokens.weight", role=EMBED),)
_NORM_AND_HEAD = (_w("model.norm.weight"), _w("lm_head.weight", role=LM_HEAD))

_ATTN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight")
_ATTN_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
              "self_attn.o_proj.bias")
_QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_MLP_BIAS = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
_PRE_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
# Gemma2/3 "sandwich" norms around both blocks.
_SANDWICH_NORMS = _PRE_NORMS + ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
# OLMo2/3 norms the block outputs instead of the inputs.
_POST_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")


def _arch(name: str, model_types: Tuple[str, ...], layer: Tuple[WeightSpec, ...], *,
          post: Tuple[WeightSpec, ...] = _NORM_AND_HEAD, **kw) -> ArchitectureSpec:
    return ArchitectureSpec(name=name, model_types=model_types, pre_weights=_EMBED,
                            layer_weights=layer, post_weights=post, **kw)


_ARCH_LIST = (
    _arch("LlamaForCausalLM", ("llama",), _layer(*_PRE_NORMS, *_ATTN, *_MLP, optional=_ATTN_BIAS + _MLP_BIAS)),
    _arch("MistralForCausalLM", ("mistral",), _layer(*_PRE_NORMS, *_ATTN, *_MLP)),
    _arch("Qwen2ForCausalLM", ("qwen2",),
          _layer(*_PRE_NORMS, *_ATTN, *_MLP, "self_attn.q_proj.bias", "self_attn.k_proj.bias",
                 "self_attn.v_proj.bias"),
          per_layer_config_keys=("layer_types",), layer_threshold_config_keys=("max_window_layers",)),
    _arch("Qwen3ForCausalLM", ("qwen3",), _layer(*_PRE_NORMS, *_ATTN, *_QK_NORM, *_MLP, optional=_ATTN_BIAS),
          per_layer_config_keys=("layer_types",), layer_threshold_config_keys=("max_window_layers",)),
    _arch("GemmaForCausalLM", ("gemma",), _layer(*_PRE_NORMS, *_ATTN, *_MLP, optional=_ATTN_BIAS)),
    _arch("Gemma2ForCausalLM", ("gemma2",), _layer(*_SANDWICH_NORMS, *_ATTN, *_MLP, optional=_ATTN_BIAS),
          per_layer_config_keys=("layer_types",)),
    # Text-only Gemma 3 (gemma-3-1b and Gemma3ForCausalLM exports); the multimodal
    # Gemma3ForConditionalGeneration has another layout and is refused.
    _arch("Gemma3ForCausalLM", ("gemma3_text",),
          _layer(*_SANDWICH_NORMS, *_ATTN, *_QK_NORM, *_MLP, optional=_ATTN_BIAS),
          per_layer_config_keys=("layer_types",)),
    _arch("Phi3ForCausalLM", ("phi3",),
          _layer(*_PRE_NORMS, "self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_up_proj.weight", "mlp.down_proj.weight")),
    # OLMo 1 uses non-parametric LayerNorm: no norm weights at all, not even a final one.
    _arch("OlmoForCausalLM", ("olmo",), _layer(*_ATTN, *_MLP, optional=_ATTN_BIAS),
          post=(_w("lm_head.weight", role=LM_HEAD),)),
    _arch("Olmo2ForCausalLM", ("olmo2",), _layer(*_POST_NORMS, *_ATTN, *_QK_NORM, *_MLP, optional=_ATTN_BIAS)),
    _arch("Olmo3ForCausalLM", ("olmo3",), _layer(*_POST_NORMS, *_ATTN, *_QK_NORM, *_MLP, optional=_ATTN_BIAS),
          per_layer_config_keys=("layer_types",)),
)

ARCHITECTURES: Dict[str, ArchitectureSpec] = {a.name: a for a in _ARCH_LIST}
