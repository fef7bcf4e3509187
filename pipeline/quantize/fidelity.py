"""Token-id fidelity: llama.cpp must turn text into exactly the ids transformers does.

A GGUF whose tokenizer splits text differently runs a model on inputs it was never trained on;
its perplexity and KL numbers would measure the tokenizer, not the quantization. So the ids of
held-out text through llama.cpp (the GGUF's own vocabulary, pre-tokenizer and merges) are compared
with transformers' before any rung is made, and a single differing id refuses the model. So are the
ids of a prompt as each runtime builds it: plain text with the special tokens each adds (bos when
``add_bos_token`` / ``tokenizer.ggml.add_bos_token`` say so), and a chat-rendered conversation whose
special tokens (``<|im_start|>`` ...) must parse to the same single ids. And ``check_conversion``
fails the ladder when the reference GGUF's next-token distributions are not transformers' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, StageFailed
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


# Conversion bounds: the reference GGUF (the checkpoint's own float type) against transformers' logits
# on the first scored window. A faithful conversion measured KL 3e-9 nats and top-1 1.0 (SmolLM2, F32;
# bench/quantize_results.md) and Q8_0 quantization ~4e-5; a conversion that loses something (a
# permuted or missing tensor, a wrong rope or norm setting) is orders of magnitude above.
MAX_CONVERSION_KLD = 1e-3
MIN_CONVERSION_TOP1 = 0.99

# A conversation rendered by the model's chat template for the special-token check.
CHAT_SAMPLE = [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "What colour is the sky?"},
               {"role": "assistant", "content": "Blue."},
               {"role": "user", "content": "And grass?"}]
PLAIN_SAMPLE = "The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class FidelityReport:
    texts_checked: int
    tokens_checked: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool | None = None          # the GGUF's tokenizer.ggml.add_bos_token, equal to transformers'
    chat_prompts_checked: int = 0        # chat-rendered prompts whose ids (special tokens parsed) are equal
    chat_not_checked: str | None = None  # why not (no chat template)

    def as_dict(self) -> dict:
        return {"texts_checked": self.texts_checked, "tokens_checked": self.tokens_checked,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "ids_identical": True, "add_bos": self.add_bos,
                "chat_prompts_checked": self.chat_prompts_checked, "chat_not_checked": self.chat_not_checked}


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _special_token_prompts(hf_tokenizer) -> tuple[list[tuple[str, list[int], str, bool]], str | None]:
    """(what, transformers' ids, the text llama.cpp gets, parse special tokens) per prompt, and why the
    chat prompts are missing (if they are)."""
    prompts = [("plain text with special tokens added", list(hf_tokenizer(PLAIN_SAMPLE)["input_ids"]), PLAIN_SAMPLE,
                False)]
    if not getattr(hf_tokenizer, "chat_template", None):
        return prompts, "the tokenizer has no chat template"
    for gen in (False, True):
        conv = CHAT_SAMPLE if gen else CHAT_SAMPLE[:3]
        try:
            text = hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            ids = list(hf_tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen,
                                                        return_dict=True)["input_ids"])
        except Exception as e:  # noqa: BLE001 - jinja errors come in many types (a template without system turns)
            return prompts, f"the chat template fails on the sample conversation ({type(e).__name__}: {e})"
        prompts.append((f"a chat-rendered conversation (add_generation_prompt={gen})", ids, text, True))
    return prompts, None


def check_special_tokens(hf_tokenizer, vocab_model, *, where: str) -> tuple[bool, int, str | None]:
    """Prompts as each runtime builds them: transformers' ids (its own special tokens; the chat template
    through ``apply_chat_template``) against llama.cpp's (``add_special``: bos when the GGUF says so;
    ``parse_special`` for rendered chat text, a leading bos text dropped when llama.cpp adds one, as
    its chat path does). Returns (the GGUF's add_bos, chat prompts checked, why not)."""
    add_bos = bool(vocab_model._model.add_bos_token())
    prompts, why_not = _special_token_prompts(hf_tokenizer)
    for what, hf_ids, text, special in prompts:
        bos_text = hf_tokenizer.bos_token
        if special and add_bos and bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        gg_ids = list(vocab_model.tokenize(text.encode("utf-8"), add_bos=True, special=special))
        if hf_ids != gg_ids:
            pos = _first_difference(hf_ids, gg_ids)
            raise ConfigError(
                where,
                f"llama.cpp builds {what} differently from transformers: first difference at token {pos} "
                f"(transformers {hf_ids[pos:pos + 6]} vs GGUF {gg_ids[pos:pos + 6]}; {len(hf_ids)} vs {len(gg_ids)} ids; "
                f"GGUF add_bos_token={add_bos}, transformers bos {hf_tokenizer.bos_token!r})",
                "a GGUF user's prompts would differ from what the model was trained on: make the tokenizer's "
                "add_bos_token / special tokens (tokenizer_config.json) match its template before quantizing")
    return add_bos, len(prompts) - 1, why_not


def check_conversion(comparison: dict, *, max_kld: float = MAX_CONVERSION_KLD,
                     min_top1: float = MIN_CONVERSION_TOP1) -> None:
    """StageFailed when the reference GGUF under llama.cpp is not transformers' model: mean KL above
    ``max_kld`` nats or top-1 agreement below ``min_top1`` (``compare_reference_with_transformers``)."""
    kld, top1 = comparison["mean_kld"], comparison["top1_agreement"]
    if not (kld <= max_kld and top1 >= min_top1):  # NaN fails too
        raise StageFailed(
            f"quantize: the unquantized reference GGUF is not the model transformers runs: on the first window "
            f"({comparison['positions']} positions) mean KL {kld:.3g} nats (at most {max_kld:g} allowed), top-1 "
            f"agreement {top1:.4f} (at least {min_top1:g} required), max |log-prob diff| "
            f"{comparison.get('max_abs_logprob_diff', float('nan')):.3g}. Every rung would inherit the conversion's "
            "error: check the converter's log (logs/convert.log) and the architecture's settings; the bounds are "
            "MAX_CONVERSION_KLD / MIN_CONVERSION_TOP1 (GgufLadderConfig.max_conversion_kld / min_conversion_top1), "
            "docs/quantize.md")


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
        add_bos, chat_prompts, chat_not_checked = check_special_tokens(hf_tokenizer, vocab_model, where=where)
        return FidelityReport(texts_checked=len(to_check), tokens_checked=n_tokens, bos_id=gg_bos, eos_id=gg_eos,
                              add_bos=add_bos, chat_prompts_checked=chat_prompts, chat_not_checked=chat_not_checked)
    finally:
        vocab_model.close()
