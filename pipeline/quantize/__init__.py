"""Quantized releases: a GGUF ladder made with llama.cpp and measured against the unquantized model.

Usable without Hydra: ``run_gguf_ladder(model_dir=..., out_dir=..., config=GgufLadderConfig(...),
eval_texts=[...], calibration_texts=[...])``; or ``python -m pipeline.quantize --help``.
Needs llama-cpp-python built by ``scripts/build_llama_cpp.sh`` (PyPI has only its sdist).
"""

from pipeline.quantize.fidelity import check_tokenizer_fidelity
from pipeline.quantize.install import find_llama_cpp
from pipeline.quantize.ladder import GgufLadderConfig, plan_ladder, run_gguf_ladder
from pipeline.quantize.types import DEFAULT_LADDER, QUANT_TYPES, parse_ladder

__all__ = ["DEFAULT_LADDER", "QUANT_TYPES", "GgufLadderConfig", "check_tokenizer_fidelity", "find_llama_cpp",
           "parse_ladder", "plan_ladder", "run_gguf_ladder"]
