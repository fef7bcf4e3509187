"""Tiny random models of every supported architecture, for tests and examples (CPU, seconds).

``make_tiny_model("MistralForCausalLM", path)`` writes a real ``save_pretrained`` directory
(safetensors, config.json, generation_config.json, a tiny tokenizer with a chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

# Per-architecture config class and the extra fields a tiny model needs (as data, like the table).
TINY_CONFIGS: Dict[str, tuple] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": 64}),
    "Qwen2ForCausalLM": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 16}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 16}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                                               "sliding_window_pattern": 2}),
    "Phi3ForCausalLM": ("Phi3Config", {}),
    "OlmoForCausalLM": ("OlmoConfig", {}),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "Olmo3ForCausalLM": ("Olmo3Config", {"sliding_window": 16}),
}
TINY_DEFAULTS: Dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def make_tiny_tokenizer(path: Path | str, vocab_size: int = 256, chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(arch: str, path: Path | str, *, seed: int = 0, dtype: Optional[str] = None,
                    tokenizer: bool = True, **overrides):
    """Build, save and return a random ``arch`` model with 4 layers of width 64 (override freely)."""
    import torch
    import transformers

    cls_name, extra = TINY_CONFIGS[arch]
    config = getattr(transformers, cls_name)(**{**TINY_DEFAULTS, **extra, **overrides})
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():  # norms start at exactly 1/0; perturb them so a wrong copy is visible
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(str(path))
    if tokenizer:
        make_tiny_tokenizer(path, vocab_size=config.vocab_size)
    return model
