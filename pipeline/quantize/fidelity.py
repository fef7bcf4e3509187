"""Token-id fidelity: llama.cpp must turn text into exactly the ids transformers does.

A GGUF whose tokenizer splits text differently runs a model on inputs it was never trained on;
its perplexity and KL numbers would measure the tokenizer, not the quantization. So the ids of
held-out text through llama.cpp (the GGUF's own vocabulary, pre-tokenizer and merges) are compared
with transformers' before any rung is made, and a single differing id refuses the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.quantize.install import import_llama_cpp

# The converter's own pre-tokenizer test string (conversion/base.py, get_vocab_base_pre): spaces,
# tabs, newlines, emoji, digits, CJK, Khmer, Cyrillic, quotes and contractions. Checked in addition
# to the held-out text when a pre-tokenizer name was forced, where proof must be strongest.
PRE_TOKENIZER_STRESS_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


@dataclass(frozen=True)
class FidelityReport:
    texts_checked: int
    tokens_checked: int
    bos_id: int | None
    eos_id: int | None

    def as_dict(self) -> dict:
        return {"texts_checked": self.texts_checked, "tokens_checked": self.tokens_checked,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "ids_identical": True}


def check_tokenizer_fidelity(*, hf_tokenizer, gguf_path: Path, texts: list[str], include_stress_text: bool = False,
                             max_chars: int = 200_000, where: str = "quantize (tokenizer)") -> FidelityReport:
    """Raise ConfigError at the first text whose llama.cpp ids differ from transformers' ids."""
    llama_cpp = import_llama_cpp()
    vocab_model = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        hf_bos, hf_eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
        gg_bos, gg_eos = vocab_model.token_bos(), vocab_model.token_eos()
        if hf_eos is not None and hf_eos != gg_eos:
            raise ConfigError(where, f"eos id differs: transformers {hf_eos}, GGUF {gg_eos}",
                              "fix the tokenizer's eos_token / generation_config before quantizing")
        if hf_bos is not None and hf_bos != gg_bos:
            raise ConfigError(where, f"bos id differs: transformers {hf_bos}, GGUF {gg_bos}",
                              "fix the tokenizer's bos_token before quantizing")
        to_check, budget = [], max_chars
        for t in texts:
            if budget <= 0:
                break
            to_check.append(t[:budget])
            budget -= len(to_check[-1])
        if include_stress_text:
            to_check.append(PRE_TOKENIZER_STRESS_TEXT)
        if not to_check:
            raise ConfigError(where, "no text to check the tokenizer on", "give held-out text (quantize.eval_files / data)")
        n_tokens = 0
        for i, text in enumerate(to_check):
            hf_ids = list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])
            gg_ids = list(vocab_model.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            if hf_ids != gg_ids:
                pos = next((k for k, (a, b) in enumerate(zip(hf_ids, gg_ids)) if a != b), min(len(hf_ids), len(gg_ids)))
                what = "the pre-tokenizer stress text" if include_stress_text and i == len(to_check) - 1 else f"held-out text #{i}"
                raise ConfigError(
                    where,
                    f"llama.cpp tokenizes {what} differently from transformers: first difference at token {pos} "
                    f"(transformers {hf_ids[pos:pos + 6]} vs GGUF {gg_ids[pos:pos + 6]}, near "
                    f"{vocab_model.detokenize(gg_ids[max(0, pos - 3):pos + 3]).decode('utf-8', 'replace')!r}); "
                    f"{len(hf_ids)} vs {len(gg_ids)} ids",
                    "a GGUF of this model would not see the text it was trained on: use a tokenizer llama.cpp supports, "
                    "or a different quantize.pre_tokenizer")
            n_tokens += len(hf_ids)
        return FidelityReport(texts_checked=len(to_check), tokens_checked=n_tokens, bos_id=gg_bos, eos_id=gg_eos)
    finally:
        vocab_model.close()
