"""The quantize stage (after eval, off by default): the final model as a ladder of quantized files,
each measured against the unquantized model.

``quantize=gguf`` (conf/quantize/gguf.yaml) makes the GGUF ladder with llama.cpp
(``pipeline.quantize``): ``<run_dir>/NN_quantize/`` holds the unquantized reference GGUF, one
``<model>-<TYPE>.gguf`` per rung, ``ladder.json`` / ``ladder.md`` / ``ladder.png`` (size, bpw,
perplexity, KL divergence and top-1 agreement against the reference, on the run's held-out text)
and, with IQ / ``+imatrix`` rungs, ``imatrix.gguf``. ``quantize=none`` (the default) skips it.
``quantize.backend=exl2`` is refused: EXL2 is not implemented (docs/quantize.md).

The input model is the last model-producing stage's (from the manifests, as every stage). The
held-out records are the eval stage's (``data.cpt_files`` split by ``data.heldout_fraction``); half
of them (by a salted content hash) calibrate the importance matrix and the other half are scored,
so the imatrix never sees the scored tokens.

Needs llama-cpp-python built by ``scripts/build_llama_cpp.sh``. Tests: tests/test_quantize.py.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pipeline.config import PipelineConfig, QuantizeConfig
from pipeline.data import check_data_files, heldout_text_records
from pipeline.errors import ConfigError
from pipeline.fsutil import hash_path
from pipeline.log import log
from pipeline.manifest import StageInput
from pipeline.quantize.data import split_eval_and_calibration
from pipeline.quantize.install import find_llama_cpp
from pipeline.quantize.ladder import GgufLadderConfig, run_gguf_ladder
from pipeline.quantize.types import parse_ladder
from pipeline.stages.stage import BaseStage, StageOutput, previous_model

BACKENDS = ("none", "gguf")
# Asked for by users, not implemented: refused by name rather than as an unknown backend.
NOT_IMPLEMENTED_BACKENDS = {"exl2": "EXL2 (exllamav2) quantization is not implemented in this pipeline"}


def ladder_config(section: QuantizeConfig, *, file_stem: str) -> GgufLadderConfig:
    return GgufLadderConfig(rungs=list(section.rungs), reference_type=section.reference_type,
                            pre_tokenizer=section.pre_tokenizer, window=section.window,
                            max_eval_tokens=section.max_eval_tokens, imatrix_ctx=section.imatrix_ctx,
                            imatrix_chunks=section.imatrix_chunks, n_threads=section.n_threads,
                            compare_with_transformers=section.compare_with_transformers, file_stem=file_stem)


def heldout_texts(cfg: PipelineConfig) -> list[str]:
    """The eval stage's held-out corpus records (same split, same order)."""
    return heldout_text_records(list(cfg.data.cpt_files), heldout_fraction=cfg.data.heldout_fraction,
                                text_column=cfg.data.text_column, txt_document_separator=cfg.data.txt_document_separator,
                                max_record_chars=cfg.data.max_record_chars)


def ladder_metrics(result: dict) -> dict:
    """Flat metrics for the manifest: ``quantize/<rung>/<metric>``."""
    out = {"quantize/reference_type": result["reference"]["type"],
           "quantize/reference_perplexity": result["reference"]["score"]["perplexity"]}
    for r in result["rungs"]:
        p = f"quantize/{r['label']}"
        out.update({f"{p}/size_mb": r["file_mb"], f"{p}/bpw": r["bpw"], f"{p}/perplexity": r["score"]["perplexity"],
                    f"{p}/mean_kld": r["score"]["mean_kld"], f"{p}/top1_agreement": r["score"]["top1_agreement"]})
    return out


class QuantizeStage(BaseStage):
    name = "quantize"
    # A failed ladder keeps its .partial dir: the rerun reuses the conversion, the reference scores,
    # the imatrix and every finished rung whose record matches (pipeline.quantize.ladder).
    resumes_partial = True

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.quantize.backend != "none"

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        section = cfg.quantize
        if section.backend in NOT_IMPLEMENTED_BACKENDS:
            raise ConfigError("quantize.backend", f"'{section.backend}': {NOT_IMPLEMENTED_BACKENDS[section.backend]}",
                              "use quantize=gguf (the GGUF ladder), or convert the released model with exllamav2's "
                              "own convert.py on a CUDA machine")
        if section.backend not in BACKENDS:
            raise ConfigError("quantize.backend", f"unknown backend '{section.backend}'", f"use one of {', '.join(BACKENDS)}")
        if section.backend == "none":
            return
        rungs = parse_ladder(section.rungs, field="quantize.rungs")
        if not 0.0 < section.calibration_fraction < 1.0 and any(r.use_imatrix for r in rungs):
            raise ConfigError("quantize.calibration_fraction", f"{section.calibration_fraction}",
                              "use a share strictly between 0 and 1: imatrix rungs need calibration and scored text")
        check_data_files(list(cfg.data.cpt_files), field="data.cpt_files", column=cfg.data.text_column,
                         column_field="data.text_column", txt_ok=True, what="raw-text files (their held-out split is scored)")
        find_llama_cpp()  # ConfigError naming scripts/build_llama_cpp.sh when it is not built

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        prev, manifest, model_dir = previous_model(cfg, self.name)
        return [StageInput(role="model", stage=prev, path=model_dir, sha256=manifest.key),
                *(StageInput(role="data", path=f, sha256=hash_path(f)) for f in cfg.data.cpt_files)]

    def key_config(self, cfg: PipelineConfig) -> dict:
        data = cfg.data
        return {"quantize": asdict(cfg.quantize),
                "data": {"cpt_files": list(data.cpt_files), "text_column": data.text_column,
                         "txt_document_separator": data.txt_document_separator,
                         "max_record_chars": data.max_record_chars, "heldout_fraction": data.heldout_fraction}}

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput:
        section = cfg.quantize
        model = next(i for i in inputs if i.role == "model")
        texts = split_eval_and_calibration(heldout_texts(cfg), calibration_fraction=section.calibration_fraction)
        log(f"GGUF ladder of {model.stage}'s model: {', '.join(section.rungs)} ({len(texts.eval_texts)} scored, "
            f"{len(texts.calibration_texts)} calibration records)", where="quantize")
        result = run_gguf_ladder(model_dir=Path(model.path), out_dir=out_dir,
                                 config=ladder_config(section, file_stem=cfg.run_name),
                                 eval_texts=texts.eval_texts, calibration_texts=texts.calibration_texts)
        return StageOutput(metrics=ladder_metrics(result), model_dir=None)
