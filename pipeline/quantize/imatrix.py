"""Importance matrix: llama.cpp's ``llama-imatrix`` on calibration text, handed to
``llama_model_quantize`` through the binding.

What was found (llama-cpp-python 0.3.36): the binding has no imatrix computation (the collection
is a graph callback inside the ``llama-imatrix`` tool), but ``llama_model_quantize_params.imatrix``
is a plain C array of ``llama_model_imatrix_data {name, data, size}`` ended by a null name, so a
computed imatrix can be passed from Python. ``scripts/build_llama_cpp.sh`` builds ``llama-imatrix``
in the wheel's kept cmake build directory (``-DLLAMA_BUILD_TOOLS=ON``, only that target: the ggml
and llama objects are reused, so it costs about a minute on top of the wheel).

The tool writes GGUF: ``<tensor>.in_sum2`` (sum of squared input activations per column, one row
per expert) and ``<tensor>.counts`` (tokens seen per expert). llama-quantize divides the sums by
the counts (1 where an expert saw no token); this does the same, so the numbers passed are the ones
the llama.cpp tool would pass.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.quantize.install import BUILD_SCRIPT, LlamaCppInstall

# Reads the tool's GGUF with the vendored gguf-py (in a subprocess: PyPI's gguf may be imported here).
_DUMP_SNIPPET = """
import sys, numpy as np
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
out = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
np.savez(sys.argv[2], **out)
"""


@dataclass
class ImportanceMatrix:
    """Per weight tensor (GGUF name), the mean squared input activation of every column."""

    values: dict[str, np.ndarray]
    chunks: int
    tokens: int
    _keepalive: list = field(default_factory=list, repr=False)

    def as_quantize_param(self, llama_cpp):
        """A null-terminated ``llama_model_imatrix_data`` array for ``params.imatrix`` (kept alive by self)."""
        entries = (llama_cpp.llama_model_imatrix_data * (len(self.values) + 1))()
        self._keepalive.clear()
        for i, (name, vec) in enumerate(sorted(self.values.items())):
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            name_b = name.encode()
            self._keepalive.extend([vec, name_b])
            entries[i].name = name_b
            entries[i].data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = vec.size
        entries[len(self.values)].name = None
        self._keepalive.append(entries)
        return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def compute_imatrix(*, install: LlamaCppInstall, reference_gguf: Path, calibration_texts: list[str], work_dir: Path,
                    n_ctx: int = 512, max_chunks: int | None = None, n_threads: int | None = None,
                    log_path: Path | None = None) -> ImportanceMatrix:
    tool = install.imatrix_tool
    if tool is None:
        raise ConfigError("quantize.rungs", "an imatrix rung was asked for but llama-imatrix was not built",
                          f"re-run {BUILD_SCRIPT} (it builds the tool after the wheel), or drop the IQ / +imatrix rungs")
    text = "\n\n".join(t.strip() for t in calibration_texts if t.strip())
    calib = work_dir / "imatrix-calibration.txt"
    calib.write_text(text)
    out = work_dir / "imatrix.gguf"
    # llama-imatrix needs at least two windows of n_ctx tokens; the caller sizes n_ctx from the
    # calibration token count (same tokenizer: the fidelity check proved the ids equal).
    # Run in work_dir with relative names: the tool records the calibration file's name in the
    # imatrix's metadata, and a published imatrix.gguf must not carry a local absolute path.
    cmd = [str(tool), "-m", str(Path(reference_gguf).absolute()), "-f", calib.name, "-o", out.name, "-c", str(n_ctx),
           "-b", str(n_ctx), "--no-ppl", "--output-format", "gguf"]
    if n_threads:
        cmd += ["-t", str(n_threads)]
    if max_chunks:
        cmd += ["--chunks", str(max_chunks)]
    proc = subprocess.run(cmd, cwd=work_dir, env=install.tool_env(), capture_output=True, text=True, check=False)
    if log_path is not None:
        log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise ConfigError("quantize (imatrix)", f"llama-imatrix failed (exit {proc.returncode}): {tail}",
                          "give more calibration text (at least two context windows), or drop the imatrix rungs")
    return load_imatrix_gguf(install=install, path=out, n_ctx=n_ctx)


def load_imatrix_gguf(*, install: LlamaCppInstall, path: Path, n_ctx: int) -> ImportanceMatrix:
    npz = path.with_suffix(".npz")
    proc = subprocess.run([sys.executable, "-c", _DUMP_SNIPPET, str(path), str(npz)], env=install.converter_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError("quantize (imatrix)", f"could not read {path}: {proc.stderr.strip()[-400:]}", f"re-run {BUILD_SCRIPT}")
    raw = dict(np.load(npz))
    values: dict[str, np.ndarray] = {}
    max_count = 0.0
    for key, sums in raw.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        counts = raw[name + ".counts"].astype(np.float32)
        per_expert = sums.reshape(counts.size, -1)
        normalised = np.where(counts[:, None] > 0, per_expert / np.maximum(counts[:, None], 1.0), 1.0)
        values[name] = normalised.reshape(-1).astype(np.float32)
        max_count = max(max_count, float(counts.max()))
    if not values:
        raise ConfigError("quantize (imatrix)", f"{path} holds no importance data", "give more calibration text")
    return ImportanceMatrix(values=values, chunks=int(max_count // n_ctx), tokens=int(max_count))
