"""The GGUF ladder: one unquantized reference GGUF, one file per quant type, each scored against
the reference with llama.cpp on the same held-out tokens.

    from pipeline.quantize import GgufLadderConfig, run_gguf_ladder
    result = run_gguf_ladder(model_dir=Path("outputs/run/03_sft"), out_dir=Path("outputs/run/06_quantize"),
                             config=GgufLadderConfig(), eval_texts=heldout, calibration_texts=calibration)

Order of work: every check that can refuse the input (quant types, llama.cpp installed, the
architecture, calibration data for imatrix rungs, disk for the whole ladder) runs before the first
file is written; then convert, prove the tokenizer, score the reference, and make + score one rung
at a time. Every file is written under a hidden temporary name and renamed when complete; a rung
counts as done only when its record (written after its file was renamed and scored) names a file
of exactly that size, so a rerun after a crash redoes the rung that was in flight and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import tokenize_records
from pipeline.errors import ConfigError, StageFailed
from pipeline.fsutil import atomic_write_json, hash_path, hash_text, sha256_file
from pipeline.quantize.convert import (
    CheckpointFacts,
    check_architecture,
    choose_reference_type,
    convert_to_gguf,
    read_checkpoint_facts,
)
from pipeline.quantize.fidelity import (
    MAX_CONVERSION_KLD,
    MIN_CONVERSION_TOP1,
    check_conversion,
    check_tokenizer_fidelity,
)
from pipeline.quantize.gguf_file import format_type_mix, tensor_type_mix
from pipeline.quantize.imatrix import ImportanceMatrix, compute_imatrix
from pipeline.quantize.install import LlamaCppInstall, find_llama_cpp, import_llama_cpp
from pipeline.quantize.report import write_ladder_reports
from pipeline.quantize.score import (
    build_windows,
    compare_reference_with_transformers,
    score_against_reference,
    score_reference,
)
from pipeline.quantize.types import DEFAULT_LADDER, QUANT_TYPES, Rung, llama_ftype, parse_ladder

# Models above this are not loaded into transformers for the reference check (memory: the whole
# model in its own dtype, on top of llama.cpp's copy).
TRANSFORMERS_CHECK_MAX_PARAMS = 3_000_000_000


@dataclass
class GgufLadderConfig:
    # Quant types, llama-quantize spelling; "+imatrix" quantizes with the importance matrix
    # (types that need one, IQ1/IQ2/IQ3_XXS/Q2_K_S, always get it).
    rungs: list[str] = field(default_factory=lambda: list(DEFAULT_LADDER))
    # auto: the checkpoint's own float type (bit-exact reference); or F32 / F16 / BF16.
    reference_type: str = "auto"
    # auto: the converter's detection (GPT-2's rule for an unknown but exactly-GPT-2 byte-level
    # BPE); or a llama.cpp pre-tokenizer name. Either way the token-id check must pass.
    pre_tokenizer: str = "auto"
    # Scoring: windows of this many tokens cut from the held-out text, at most max_eval_tokens.
    # The reference's log-probs take positions x vocab x 4 bytes of scratch disk
    # (8,192 x 49,152 x 4 = 1.6 GB for SmolLM2).
    window: int = 512
    max_eval_tokens: int = 8192
    # llama-imatrix context (shrunk to half the calibration tokens when there are fewer) and the
    # most windows it reads (128 x 512 = 65,536 tokens: ~2 min for a 135M model on 2 cores).
    imatrix_ctx: int = 512
    imatrix_chunks: int | None = 128
    n_threads: int | None = None
    # Compare the reference GGUF with transformers' own logits on the first window, and fail the
    # ladder above this mean KL (nats) / below this top-1 agreement (pipeline.quantize.fidelity).
    compare_with_transformers: bool = True
    max_conversion_kld: float = MAX_CONVERSION_KLD
    min_conversion_top1: float = MIN_CONVERSION_TOP1
    # Disk needed = estimate x this margin (small models' files run above the nominal bpw).
    disk_margin: float = 1.3
    # File names: <stem>-<TYPE>.gguf; default the model directory's name.
    file_stem: str | None = None
    plot: bool = True


@dataclass
class LadderPlan:
    install: LlamaCppInstall
    rungs: list[Rung]
    facts: CheckpointFacts
    reference_type: str
    reference_why: str
    stem: str
    needs_imatrix: bool
    estimated_bytes: int


def _vocab_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config") or {}
    return int(config.get("vocab_size") or text.get("vocab_size") or 0)


def estimate_ladder_bytes(*, facts: CheckpointFacts, reference_type: str, rungs: list[Rung], scratch_positions: int,
                          vocab_size: int, margin: float) -> int:
    """Reference + every rung (parameters x approximate bpw) + the reference log-prob scratch."""
    ref = facts.n_params * QUANT_TYPES[reference_type].approx_bpw / 8
    files = sum(facts.n_params * r.quant.approx_bpw / 8 for r in rungs)
    scratch = scratch_positions * vocab_size * 4
    return int((ref + files) * margin + scratch)


def _free_bytes(path: Path) -> int:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def plan_ladder(*, model_dir: Path, out_dir: Path, config: GgufLadderConfig, eval_texts: list[str],
                calibration_texts: list[str] | None) -> LadderPlan:
    """Every refusal, before anything is written."""
    rungs = parse_ladder(config.rungs)
    if config.window < 8:
        raise ConfigError("quantize.window", f"{config.window} tokens is too short to score", "use 128 or more")
    if config.max_eval_tokens < 2:
        raise ConfigError("quantize.max_eval_tokens", f"{config.max_eval_tokens}", "use at least one window of tokens")
    if not any(t.strip() for t in eval_texts):
        raise ConfigError("quantize (held-out data)", "no held-out text to score the rungs on",
                          "give held-out text (the run's data split, or quantize.eval_files)")
    needs_imatrix = any(r.use_imatrix for r in rungs)
    if needs_imatrix and not any(t.strip() for t in (calibration_texts or [])):
        labels = [r.label for r in rungs if r.use_imatrix]
        raise ConfigError("quantize.rungs", f"{labels} need an importance matrix, and no calibration text was given",
                          "give calibration text (the run's held-out data), or drop those rungs")
    install = find_llama_cpp()
    if needs_imatrix and install.imatrix_tool is None:
        raise ConfigError("quantize.rungs", "imatrix rungs need llama-imatrix, which was not built",
                          "re-run scripts/build_llama_cpp.sh (it builds the tool after the wheel), or drop those rungs")
    facts = read_checkpoint_facts(model_dir)
    check_architecture(install, facts, model_dir=model_dir)
    ref_type, why = choose_reference_type(facts, config.reference_type)
    positions = min(config.max_eval_tokens, sum(len(t) for t in eval_texts))  # chars >= tokens: an upper bound
    estimate = estimate_ladder_bytes(facts=facts, reference_type=ref_type, rungs=rungs, scratch_positions=positions,
                                     vocab_size=_vocab_size(model_dir), margin=config.disk_margin)
    free = _free_bytes(out_dir)
    if estimate > free:
        raise ConfigError("quantize (disk)", f"the ladder needs about {estimate / 1e9:.2f} GB in {out_dir} "
                          f"({facts.n_params / 1e6:.1f}M parameters: {ref_type} reference + {len(rungs)} rungs + scoring "
                          f"scratch) and only {free / 1e9:.2f} GB are free",
                          "free space, write elsewhere (paths.output_root), or list fewer rungs / fewer max_eval_tokens")
    stem = config.file_stem or model_dir.resolve().name
    return LadderPlan(install=install, rungs=rungs, facts=facts, reference_type=ref_type, reference_why=why, stem=stem,
                      needs_imatrix=needs_imatrix, estimated_bytes=estimate)


@contextlib.contextmanager
def _native_output_to(log_path: Path | None) -> Iterator[None]:
    """Send llama.cpp's output while quantizing (a line per tensor, a warning per fallback) into
    ``log_path`` instead of the console: both what the binding's log callback prints through
    ``sys.stdout``/``sys.stderr`` and what C code writes to file descriptors 1 and 2."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "a", encoding="utf-8", errors="replace") as log_file:
        try:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                yield
                log_file.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quantize_rung(*, llama_cpp, source: Path, dest: Path, rung: Rung, imatrix: ImportanceMatrix | None,
                  n_threads: int | None, log_path: Path | None = None) -> float:
    """``llama_model_quantize`` into a temporary name, renamed when it returned 0. Returns seconds."""
    tmp = dest.parent / f".{dest.name}.partial"
    tmp.unlink(missing_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(llama_cpp, rung.quant)
    params.nthread = n_threads or 0
    if rung.use_imatrix:
        if imatrix is None:
            raise StageFailed(f"{rung.label}: no importance matrix was computed")
        params.imatrix = imatrix.as_quantize_param(llama_cpp)
    start = time.perf_counter()
    # The binding's log callback drops llama.cpp's info lines once any Llama(verbose=False) was made
    # (it sets this logger to ERROR); let them through into the rung's log while quantizing.
    binding_logger = logging.getLogger("llama-cpp-python")
    previous_level = binding_logger.level
    binding_logger.setLevel(logging.INFO if log_path is not None else previous_level)
    try:
        with _native_output_to(log_path):
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        binding_logger.setLevel(previous_level)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise StageFailed(f"llama_model_quantize failed for {rung.label} (return code {rc}); llama.cpp's log: "
                          f"{log_path if log_path else 'above'}")
    os.replace(tmp, dest)
    return time.perf_counter() - start


def _load_record(path: Path, gguf: Path, scored_on: str | None = None) -> dict | None:
    """A finished rung's record: its file has the recorded size and (``scored_on``) it was made and
    scored from the same reference, on the same tokens, with the same settings."""
    if not path.is_file() or not gguf.is_file():
        return None
    record = json.loads(path.read_text())
    if scored_on is not None and record.get("scored_on") != scored_on:
        return None
    return record if record.get("file_bytes") == gguf.stat().st_size else None


def _scored_on(*, source_hash: str, reference_type: str, windows: list[list[int]], rung: Rung,
               imatrix_record: dict | None) -> str:
    """What a rung's record depends on: the model's content, the reference type, the scored token
    ids, the rung's settings and (imatrix rungs) the importance matrix's record."""
    return hash_text(json.dumps({"source": source_hash, "reference": reference_type, "windows": hash_text(json.dumps(windows)),
                                 "rung": [rung.label, rung.quant.name, rung.use_imatrix],
                                 "imatrix": imatrix_record if rung.use_imatrix else None}, sort_keys=True))


def _reference_scores(*, ref_path: Path, windows: list[list[int]], scratch_dir: Path, n_threads: int | None,
                      desc: str, made_from: str):
    """The reference's log-probs on ``windows``: kept in the scratch dir with a record of what they
    were computed on (reference record + token ids), so a rerun after a failed rung reuses them."""
    import numpy as np

    from pipeline.quantize.score import ReferenceRun, RungScore

    scratch, record_path = scratch_dir / "reference_logprobs.npy", scratch_dir / "reference_scores.json"
    key = hash_text(json.dumps({"reference": made_from, "windows": hash_text(json.dumps(windows))}))
    if record_path.is_file() and scratch.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            targets = np.asarray([t for w in windows for t in w[1:]], dtype=np.int64)
            return ReferenceRun(logprobs=np.load(scratch, mmap_mode="r"), targets=targets,
                                score=RungScore(**record["score"]), model_bytes=record["model_bytes"],
                                model_params=record["model_params"])
    record_path.unlink(missing_ok=True)
    run = score_reference(gguf_path=ref_path, windows=windows, scratch=scratch, n_threads=n_threads, desc=desc)
    atomic_write_json(record_path, {"key": key, "score": run.score.as_dict(), "model_bytes": run.model_bytes,
                                    "model_params": run.model_params})
    return run


def with_file_facts(record: dict, gguf: Path, record_path: Path) -> dict:
    """The rung's record with what its file really holds (the share of parameters per tensor type,
    read back from the file) and its sha256 (two rungs that came out as the same file are marked so);
    added to a record written before these were kept."""
    if "tensor_types" not in record or "sha256" not in record:
        mix = tensor_type_mix(gguf)
        record = {**record, "tensor_types": mix, "tensor_types_text": format_type_mix(mix), "sha256": sha256_file(gguf)}
        atomic_write_json(record_path, record)
    return record


def run_gguf_ladder(*, model_dir: Path, out_dir: Path, config: GgufLadderConfig, eval_texts: list[str],
                    calibration_texts: list[str] | None = None) -> dict:
    """Make and score the ladder; returns what ladder.json holds."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    plan = plan_ladder(model_dir=model_dir, out_dir=out_dir, config=config, eval_texts=eval_texts,
                       calibration_texts=calibration_texts)
    llama_cpp = import_llama_cpp()
    from transformers import AutoTokenizer  # heavy: imported when a ladder is made, not on import

    out_dir.mkdir(parents=True, exist_ok=True)
    records_dir, logs_dir, scratch_dir = out_dir / ".records", out_dir / "logs", out_dir / ".scratch"
    for d in (records_dir, logs_dir, scratch_dir):
        d.mkdir(exist_ok=True)

    # A reference made from other weights invalidates every record.
    source_hash = hash_path(model_dir)
    ref_path = out_dir / f"{plan.stem}-{plan.reference_type}.gguf"
    ref_record = _load_record(records_dir / "reference.json", ref_path)
    if ref_record is None or ref_record.get("source_hash") != source_hash:
        for stale in records_dir.glob("*.json"):
            stale.unlink()
        start = time.perf_counter()
        forced = convert_to_gguf(install=plan.install, model_dir=model_dir, out_path=ref_path, out_type=plan.reference_type,
                                 facts=plan.facts, pre_tokenizer=config.pre_tokenizer, log_path=logs_dir / "convert.log")
        ref_record = {"source_hash": source_hash, "convert_s": time.perf_counter() - start, "forced_pre_tokenizer": forced,
                      "file_bytes": ref_path.stat().st_size}
        atomic_write_json(records_dir / "reference.json", ref_record)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    fidelity = check_tokenizer_fidelity(hf_tokenizer=tokenizer, gguf_path=ref_path, texts=eval_texts,
                                        include_stress_text=ref_record.get("forced_pre_tokenizer") is not None)

    windows = build_windows(tokenize_records(tokenizer, eval_texts), window=config.window, max_tokens=config.max_eval_tokens)
    if not windows:
        raise ConfigError("quantize (held-out data)", "the held-out text is under two tokens", "give more held-out text")
    reference = _reference_scores(ref_path=ref_path, windows=windows, scratch_dir=scratch_dir, n_threads=config.n_threads,
                                  desc=f"{plan.reference_type} reference", made_from=json.dumps(ref_record, sort_keys=True))
    result: dict = {
        "model_name": plan.stem,
        "llama_cpp_python": plan.install.version,
        "complete": False,
        "scoring": {"runtime": "llama.cpp (llama-cpp-python)", "window": len(windows[0]), "windows": len(windows),
                    "positions": reference.score.positions},
        "reference": {"type": plan.reference_type, "why": plan.reference_why, "file": ref_path.name,
                      "file_mb": ref_path.stat().st_size / 1e6, "bpw": reference.model_bytes * 8 / reference.model_params,
                      "n_params": reference.model_params, "convert_s": ref_record["convert_s"],
                      "score": reference.score.as_dict()},
        "tokenizer_fidelity": {**fidelity.as_dict(), "forced_pre_tokenizer": ref_record.get("forced_pre_tokenizer")},
        "estimated_disk_gb": plan.estimated_bytes / 1e9,
        "rungs": [],
    }
    if config.compare_with_transformers and plan.facts.n_params <= TRANSFORMERS_CHECK_MAX_PARAMS:
        result["reference_vs_transformers"] = compare_reference_with_transformers(model_dir=model_dir, window=windows[0],
                                                                                  reference=reference)
        check_conversion(result["reference_vs_transformers"], max_kld=config.max_conversion_kld,
                         min_top1=config.min_conversion_top1)
        result["conversion_verified"] = {"verified": True, "max_kld": config.max_conversion_kld,
                                         "min_top1": config.min_conversion_top1}
    else:
        why = ("compare_with_transformers is off" if not config.compare_with_transformers else
               f"{plan.facts.n_params / 1e9:.1f}B parameters, above the {TRANSFORMERS_CHECK_MAX_PARAMS / 1e9:.0f}B loaded "
               "into transformers for the check")
        result["conversion_verified"] = {"verified": False, "why": why}

    imatrix = None
    # The imatrix is computed only when an imatrix rung still has to be made (a rerun after all of
    # them finished reuses the record of the one they were made with).
    imatrix_record = records_dir / "imatrix.json"
    saved_imatrix = json.loads(imatrix_record.read_text()) if imatrix_record.is_file() else None

    def scored_on(rung: Rung, imatrix_rec: dict | None) -> str:
        return _scored_on(source_hash=source_hash, reference_type=plan.reference_type, windows=windows, rung=rung,
                          imatrix_record=imatrix_rec)

    pending_imatrix = [r for r in plan.rungs if r.use_imatrix
                       and _load_record(records_dir / f"{r.label}.json", out_dir / r.file_name(plan.stem),
                                        scored_on(r, saved_imatrix)) is None]
    if plan.needs_imatrix and not pending_imatrix and imatrix_record.is_file():
        result["imatrix"] = json.loads(imatrix_record.read_text())
    elif plan.needs_imatrix:
        calib_ids = tokenize_records(tokenizer, calibration_texts or [])
        n_calib = sum(len(d) for d in calib_ids)
        n_ctx = min(config.imatrix_ctx, n_calib // 2)
        if n_ctx < 16:
            raise ConfigError("quantize (calibration data)", f"{n_calib} calibration tokens are too few for an importance matrix",
                              "give more calibration text (at least a few thousand tokens)")
        imatrix = compute_imatrix(install=plan.install, reference_gguf=ref_path, calibration_texts=calibration_texts or [],
                                  work_dir=scratch_dir, n_ctx=n_ctx, max_chunks=config.imatrix_chunks,
                                  n_threads=config.n_threads,
                                  log_path=logs_dir / "imatrix.log")
        # A new imatrix makes every earlier imatrix rung stale: they are remade with this one.
        for r in plan.rungs:
            if r.use_imatrix:
                (records_dir / f"{r.label}.json").unlink(missing_ok=True)
        shutil.copyfile(scratch_dir / "imatrix.gguf", out_dir / ".imatrix.gguf.tmp")
        os.replace(out_dir / ".imatrix.gguf.tmp", out_dir / "imatrix.gguf")
        result["imatrix"] = {"file": "imatrix.gguf", "tokens": imatrix.tokens, "chunks": imatrix.chunks, "n_ctx": n_ctx,
                             "entries": len(imatrix.values),
                             # Calibrating on the scored text would flatter the imatrix rungs.
                             "calibration_texts_also_scored": len(set(calibration_texts or []) & set(eval_texts))}
        atomic_write_json(imatrix_record, result["imatrix"])

    try:
        for rung in plan.rungs:
            gguf = out_dir / rung.file_name(plan.stem)
            record_path = records_dir / f"{rung.label}.json"
            key = scored_on(rung, result.get("imatrix"))
            record = _load_record(record_path, gguf, key)
            if record is None:
                quantize_s = quantize_rung(llama_cpp=llama_cpp, source=ref_path, dest=gguf, rung=rung, imatrix=imatrix,
                                           n_threads=config.n_threads, log_path=logs_dir / f"quantize-{rung.label}.log")
                score, size, params = score_against_reference(gguf_path=gguf, windows=windows, reference=reference,
                                                              n_threads=config.n_threads, desc=rung.label)
                record = {"label": rung.label, "type": rung.quant.name, "imatrix": rung.use_imatrix, "file": gguf.name,
                          "file_bytes": gguf.stat().st_size, "file_mb": gguf.stat().st_size / 1e6,
                          "bpw": size * 8 / params, "quantize_s": quantize_s, "score": score.as_dict(),
                          "scored_on": key}
                atomic_write_json(record_path, record)
            result["rungs"].append(with_file_facts(record, gguf, record_path))
            write_ladder_reports(result, out_dir, plot=False)
        result["complete"] = True
        write_ladder_reports(result, out_dir, plot=config.plot)
    finally:
        reference.logprobs._mmap.close()  # release before removing the scratch file
    # Kept until the ladder is complete: a rerun after a failed rung reuses the reference's log-probs.
    shutil.rmtree(scratch_dir, ignore_errors=True)
    return result
