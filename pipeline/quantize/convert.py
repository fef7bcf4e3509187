"""Hugging Face directory -> unquantized GGUF, with llama.cpp's own converter in a subprocess.

The converter recognises a BPE pre-tokenizer by hashing the ids of a fixed test string; a tokenizer
it does not know (one trained locally, like the demo's) makes it raise NotImplementedError. When
the tokenizer's pre-tokenizer is exactly GPT-2's byte-level regex, the converter's ``gpt-2``
pre-tokenizer is the same rule, so that name is written instead; the caller then proves it with
the token-id check (``fidelity.check_tokenizer_fidelity``) and refuses the model if any id differs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.quantize.install import BUILD_SCRIPT, LlamaCppInstall, converter_architectures

# Above this many parameters an F32 reference of an F32 checkpoint is too costly to score every
# rung against (4 bytes a weight); F16 then (not bit-exact, and the result says so).
F32_REFERENCE_MAX_PARAMS = 3_000_000_000
PRETOKENIZER_NOT_RECOGNISED = "BPE pre-tokenizer was not recognized"

# Runs the converter with get_vocab_base_pre answering a fixed name; used only for a tokenizer the
# converter does not recognise, and only kept when the token ids then match (checked afterwards).
_FORCED_PRE_TOKENIZER_SHIM = """
import os, runpy, sys
import conversion.base as base
forced = os.environ["DUS_FORCED_PRE_TOKENIZER"]
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: forced
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

_SAFETENSORS_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
                           "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


@dataclass(frozen=True)
class CheckpointFacts:
    architecture: str
    n_params: int
    dtypes: dict[str, int]        # safetensors dtype -> number of parameters stored in it
    pre_tokenizer_is_gpt2_bytelevel: bool


def read_checkpoint_facts(model_dir: Path) -> CheckpointFacts:
    """Architecture, parameter count and stored dtypes from config.json and the safetensors headers
    (no weights read): enough to refuse a model and estimate the ladder's disk before any work."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError("quantize.model_dir", f"{model_dir} has no config.json", "point at a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise ConfigError(f"{config_path}", "no 'architectures' entry", "save the model with save_pretrained")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError("quantize.model_dir", f"{model_dir} has no .safetensors weights",
                          "save the model with safetensors (pickle checkpoints are not converted)")
    dtypes: dict[str, int] = {}
    for f in files:
        with open(f, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + numel
    return CheckpointFacts(architecture=archs[0], n_params=sum(dtypes.values()), dtypes=dtypes,
                           pre_tokenizer_is_gpt2_bytelevel=_is_gpt2_bytelevel(model_dir))


def _is_gpt2_bytelevel(model_dir: Path) -> bool:
    """The tokenizer splits text exactly by GPT-2's byte-level regex and nothing else."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tok = json.loads(path.read_text())
    pre, model = tok.get("pre_tokenizer") or {}, tok.get("model") or {}
    return (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and tok.get("normalizer") is None)


def choose_reference_type(facts: CheckpointFacts, requested: str = "auto") -> tuple[str, str]:
    """(GGUF type, why). ``auto`` keeps the checkpoint's own float type, so the reference holds the
    very same numbers the HF model computes with: F32 for F32 weights (up to a size), BF16/F16 for
    BF16/F16 weights. Converting F32 -> F16 would round every weight before quantization starts."""
    if requested != "auto":
        if requested not in ("F32", "F16", "BF16"):
            raise ConfigError("quantize.reference_type", f"'{requested}' is not an unquantized GGUF type", "use auto, F32, F16 or BF16")
        return requested, "as configured"
    floats = {k: v for k, v in facts.dtypes.items() if k in ("F32", "F16", "BF16", "F64")}
    main = max(floats, key=floats.get) if floats else "F32"
    if main in ("F16", "BF16"):
        return main, f"the checkpoint stores {main}: the reference is bit-exact"
    if facts.n_params <= F32_REFERENCE_MAX_PARAMS:
        return "F32", "the checkpoint stores F32: the reference is bit-exact"
    return "F16", (f"the checkpoint stores F32 but has {facts.n_params / 1e9:.1f}B parameters: F16 reference "
                   "(weights rounded to F16; not bit-exact)")


def check_architecture(install: LlamaCppInstall, facts: CheckpointFacts, *, model_dir: Path) -> None:
    known = converter_architectures(str(install.converter_script.parent))
    if facts.architecture not in known:
        raise ConfigError(f"{model_dir}/config.json", f"architecture '{facts.architecture}' is not supported by llama.cpp's "
                          f"converter (llama-cpp-python {install.version})",
                          "use GGUF only for an architecture llama.cpp supports, or turn the GGUF ladder off (quantize=none)")


def convert_to_gguf(*, install: LlamaCppInstall, model_dir: Path, out_path: Path, out_type: str,
                    facts: CheckpointFacts, pre_tokenizer: str = "auto", log_path: Path | None = None) -> str | None:
    """Write ``out_path`` (renamed into place only when the converter succeeded).

    ``pre_tokenizer``: ``auto`` (the converter's own detection; GPT-2's rule when the converter does
    not know the tokenizer but its pre-tokenizer is exactly GPT-2's byte-level regex) or a llama.cpp
    pre-tokenizer name to write for a tokenizer the converter does not recognise. Returns the forced
    name, or None when the converter recognised the tokenizer itself.
    """
    check_architecture(install, facts, model_dir=model_dir)
    if pre_tokenizer != "auto":
        _run_converter(install=install, model_dir=model_dir, out_path=out_path, out_type=out_type,
                       forced_pre_tokenizer=pre_tokenizer, log_path=log_path)
        return pre_tokenizer
    try:
        _run_converter(install=install, model_dir=model_dir, out_path=out_path, out_type=out_type,
                       forced_pre_tokenizer=None, log_path=log_path)
        return None
    except _PreTokenizerNotRecognised:
        if not facts.pre_tokenizer_is_gpt2_bytelevel:
            raise ConfigError(f"{model_dir}/tokenizer.json",
                              "llama.cpp's converter does not recognise this tokenizer's BPE pre-tokenizer (it hashes "
                              "the ids of a test string and knows only published tokenizers), so a GGUF would split "
                              "text differently from the trained model",
                              "use a tokenizer llama.cpp knows (e.g. the base model's own), or set quantize.pre_tokenizer "
                              "to the llama.cpp pre-tokenizer that splits text the same way (e.g. gpt-2, llama-bpe, qwen2); "
                              "the token-id check then refuses it if any id differs") from None
        _run_converter(install=install, model_dir=model_dir, out_path=out_path, out_type=out_type,
                       forced_pre_tokenizer="gpt-2", log_path=log_path)
        return "gpt-2"


class _PreTokenizerNotRecognised(Exception):
    pass


def _run_converter(*, install: LlamaCppInstall, model_dir: Path, out_path: Path, out_type: str,
                   forced_pre_tokenizer: str | None, log_path: Path | None) -> None:
    tmp = out_path.parent / f".{out_path.name}.partial"
    tmp.unlink(missing_ok=True)
    args = [str(install.converter_script), str(model_dir), "--outfile", str(tmp), "--outtype", out_type.lower()]
    env = install.converter_env()
    if forced_pre_tokenizer is None:
        cmd = [sys.executable, *args]
    else:
        env["DUS_FORCED_PRE_TOKENIZER"] = forced_pre_tokenizer
        cmd = [sys.executable, "-c", _FORCED_PRE_TOKENIZER_SHIM, *args]
    proc = subprocess.run(cmd, env=env, cwd=str(install.converter_script.parent), capture_output=True, text=True, check=False)
    if log_path is not None:
        log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        if PRETOKENIZER_NOT_RECOGNISED in proc.stderr:
            raise _PreTokenizerNotRecognised()
        raise ConfigError(str(model_dir), f"llama.cpp's converter failed (exit {proc.returncode}): "
                          f"{_last_error_line(proc.stderr)}",
                          f"see {log_path} for the whole log" if log_path else f"check the model directory; re-run {BUILD_SCRIPT}")
    os.replace(tmp, out_path)


def _last_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln.strip()[:400]
    return (lines[-1] if lines else "no output")[:400]
