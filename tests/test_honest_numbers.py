"""Issue 18, "numbers that mislead": every number means what its label says.

Each test names the item it guards. The GGUF files here are real ones written with the ``gguf``
package (the same reader the ladder uses on llama.cpp's output), not stand-ins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]], arch: str = "llama",
                metadata: dict[str, str] | None = None) -> Path:
    """A GGUF file holding ``tensors`` ({name: (GGML type name, float32 array)}), quantized by gguf's
    own quantizer for Q8_0."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, (kind, array) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, array.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            data = quantize(array.astype(np.float32), qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- item 12: the ladder


def _rung_record(label: str, quant: str, file: str, *, mb: float, imatrix: bool = False) -> dict:
    return {"label": label, "type": quant, "imatrix": imatrix, "file": file, "file_bytes": 1, "file_mb": mb,
            "bpw": 8.5, "quantize_s": 1.0,
            "score": {"perplexity": 50.0, "mean_kld": 0.01, "kld_p99": 0.1, "top1_agreement": 0.9, "score_s": 1.0}}


def test_item12_each_rung_reports_its_real_type_mix_and_identical_files_are_marked(tmp_path):
    """Rows say what the written file holds (read back from the GGUF), and a rung that came out as the
    same file as another (the demo's Q6_K and Q8_0) is marked so, in ladder.md and in the card."""
    from pipeline.quantize.gguf_file import tensor_type_mix
    from pipeline.quantize.ladder import with_file_facts
    from pipeline.quantize.report import ladder_markdown, write_ladder_reports
    from pipeline.release.card import ladder_table

    rng = np.random.default_rng(0)
    big, norm = rng.standard_normal((64, 96)), np.ones(64)
    # What llama.cpp does to a K-quant on 96-wide rows: falls back (here to Q8_0) for that tensor.
    q8 = _write_gguf(tmp_path / "m-Q8_0.gguf", {"blk.0.w": ("Q8_0", big), "blk.0.norm": ("F32", norm)})
    q6 = tmp_path / "m-Q6_K.gguf"
    q6.write_bytes(q8.read_bytes())
    f16 = _write_gguf(tmp_path / "m-F16.gguf", {"blk.0.w": ("F16", big), "blk.0.norm": ("F32", norm)})

    mix = tensor_type_mix(q8)
    assert list(mix) == ["Q8_0", "F32"] and mix["Q8_0"] == pytest.approx(64 * 96 / (64 * 96 + 64))

    records = tmp_path / ".records"
    records.mkdir()
    rungs = []
    for label, quant, path, mb in (("F16", "F16", f16, 12.0), ("Q6_K", "Q6_K", q6, 6.5), ("Q8_0", "Q8_0", q8, 6.5)):
        rec = _rung_record(label, quant, path.name, mb=mb)
        (records / f"{label}.json").write_text(json.dumps(rec))
        rungs.append(with_file_facts(rec, path, records / f"{label}.json"))
    # The facts are kept in the rung's record, so a rerun reuses them.
    assert json.loads((records / "Q6_K.json").read_text())["tensor_types_text"] == "99% Q8_0, 1% F32"

    result = {"model_name": "m", "complete": True, "rungs": rungs,
              "scoring": {"runtime": "llama.cpp", "window": 512, "windows": 2, "positions": 1022},
              "reference": {"type": "F32", "why": "checkpoint dtype", "file": "m-F32.gguf", "file_mb": 24.0, "bpw": 32.0,
                            "convert_s": 1.0, "score": {"perplexity": 49.0, "positions": 1022, "score_s": 1.0}},
              "tokenizer_fidelity": {"texts_checked": 1, "tokens_checked": 10}}
    write_ladder_reports(result, tmp_path, plot=False)
    saved = json.loads((tmp_path / "ladder.json").read_text())
    assert [r["same_file_as"] for r in saved["rungs"]] == [None, None, "Q6_K"]
    md = ladder_markdown(saved)
    assert "| Q6_K | 6.5 |" in md and "| Q8_0 (same file as Q6_K) |" in md
    assert "99% Q8_0, 1% F32" in md and "99% F16, 1% F32" in md
    card = "\n".join(ladder_table(saved))
    assert "Q8_0 (**same file as Q6_K**)" in card and "99% Q8_0, 1% F32" in card


def test_item12_the_ollama_tag_of_an_imatrix_rung_is_its_quant_type():
    from pipeline.release.card import _run_gguf_lines

    rung = _rung_record("Q4_K_M+imatrix", "Q4_K_M", "m-Q4_K_M-imat.gguf", mb=2.0, imatrix=True)
    text = "\n".join(_run_gguf_lines(rung, "me/m-GGUF"))
    assert "ollama run hf.co/me/m-GGUF:Q4_K_M " in text and ":imat" not in text
