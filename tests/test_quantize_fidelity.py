"""The GGUF conversion is checked at run time (issue 18 item 8), with the real llama.cpp: a reference
GGUF that is not transformers' model fails the ladder (stated KL / top-1 bounds), and the ids of prompts
as each runtime builds them (special tokens added, chat-rendered text with its special tokens parsed)
must equal transformers'. Skipped with the reason when llama.cpp is not built."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEMO_CORPUS
from test_quantize import _install_or_skip, _tiny_llama_with_vocab

from pipeline.data import load_text_records
from pipeline.errors import ConfigError, StageFailed
from pipeline.quantize.fidelity import MAX_CONVERSION_KLD, MIN_CONVERSION_TOP1, check_conversion

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PLAIN_CHAT = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def one_rung_ladder(tmp_path_factory):
    install = _install_or_skip()
    model = _tiny_llama_with_vocab(tmp_path_factory.mktemp("fidelity") / "tiny-llama", install, "gpt-2",
                                   hidden=256, layers=2)
    from pipeline.quantize import GgufLadderConfig, run_gguf_ladder

    out = model.parent / "ladder"
    config = GgufLadderConfig(rungs=["Q8_0"], window=128, max_eval_tokens=256, n_threads=2, plot=False)
    texts = load_text_records([str(DEMO_CORPUS)])[:10]
    result = run_gguf_ladder(model_dir=model, out_dir=out, config=config, eval_texts=texts)
    return model, out, config, texts, result


def test_a_faithful_conversion_is_verified_and_says_so(one_rung_ladder):
    _, out, _, _, result = one_rung_ladder
    assert result["conversion_verified"] == {"verified": True, "max_kld": MAX_CONVERSION_KLD,
                                             "min_top1": MIN_CONVERSION_TOP1}
    assert result["reference_vs_transformers"]["mean_kld"] <= MAX_CONVERSION_KLD
    assert result["tokenizer_fidelity"]["add_bos"] is False  # GPT-2: neither runtime adds a bos
    assert "Conversion verified: within KL 0.001 nats and top-1 0.99" in (out / "ladder.md").read_text()


def test_a_reference_gguf_that_is_not_the_model_fails_the_ladder(one_rung_ladder):
    """The reference kept from an earlier run (same size, same source) whose weights are not the model's
    any more: the rerun reuses it, and the comparison with transformers fails the stage."""
    from pipeline.quantize import run_gguf_ladder

    model, out, config, texts, result = one_rung_ladder
    ref = out / result["reference"]["file"]
    size = ref.stat().st_size
    with open(ref, "r+b") as f:  # zero the tensor data past the metadata; the file keeps its size
        f.seek(size // 4)
        f.write(b"\0" * (size - 16 - size // 4))
    assert ref.stat().st_size == size
    with pytest.raises(StageFailed, match=r"reference GGUF is not the model transformers runs: .*at most 0.001 "
                                          r"allowed.*docs/quantize.md"):
        run_gguf_ladder(model_dir=model, out_dir=out, config=config, eval_texts=texts)


@pytest.mark.parametrize("kld, top1, fails", [(3e-9, 1.0, False), (2e-3, 1.0, True), (1e-5, 0.95, True),
                                              (float("nan"), 1.0, True)])
def test_conversion_bounds(kld, top1, fails):
    comparison = {"positions": 127, "mean_kld": kld, "top1_agreement": top1, "max_abs_logprob_diff": 0.0}
    if fails:
        with pytest.raises(StageFailed, match="not the model transformers runs"):
            check_conversion(comparison)
    else:
        check_conversion(comparison)


def _reference_and_tokenizer(one_rung_ladder):
    from transformers import AutoTokenizer

    model, out, _, texts, result = one_rung_ladder
    return out / result["reference"]["file"], AutoTokenizer.from_pretrained(model), texts


def test_chat_rendered_prompts_with_special_tokens_are_checked(one_rung_ladder):
    from pipeline.quantize import check_tokenizer_fidelity

    ref, tok, texts = _reference_and_tokenizer(one_rung_ladder)
    tok.chat_template = PLAIN_CHAT  # eos_token (<|endoftext|>) is special in both runtimes
    report = check_tokenizer_fidelity(hf_tokenizer=tok, gguf_path=ref, texts=texts[:2])
    assert report.chat_prompts_checked == 2 and report.chat_not_checked is None
    # ChatML markers that transformers knows as special tokens but the GGUF does not: llama.cpp would
    # split them into pieces. Plain text alone (the check before this) matches; the chat prompt does not.
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    with pytest.raises(ConfigError, match=r"builds a chat-rendered conversation \(add_generation_prompt=False\) "
                                          r"differently from transformers"):
        check_tokenizer_fidelity(hf_tokenizer=tok, gguf_path=ref, texts=texts[:2])


def test_a_bos_that_only_one_runtime_adds_is_refused(one_rung_ladder):
    from pipeline.quantize import check_tokenizer_fidelity

    ref, tok, texts = _reference_and_tokenizer(one_rung_ladder)
    tok.add_bos_token = True  # transformers now prefixes bos; the GGUF says add_bos_token=false
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    with pytest.raises(ConfigError, match=r"plain text with special tokens added differently.*GGUF add_bos_token=False"):
        check_tokenizer_fidelity(hf_tokenizer=tok, gguf_path=ref, texts=texts[:2])
