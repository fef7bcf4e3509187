"""EXL2 (exllamav2) backend: not available on CPU machines.

exllamav2 compiles its CUDA extension when imported, so ``import exllamav2`` fails without CUDA
(``CUDA_HOME environment variable is not set``). This refuses up front with what to do instead;
the conversion itself (``exllamav2/convert.py`` with a calibration parquet) is for a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def run_exl2(*, model_dir: Path, out_dir: Path, bits_per_weight: float = 4.0) -> None:
    if not cuda_available():
        raise ConfigError("quantize.backend", "EXL2 quantization (exllamav2) needs a CUDA GPU and none is available here",
                          "run the exl2 backend on a CUDA machine (pip install exllamav2 there), or use the GGUF ladder "
                          "(quantize=gguf), which runs on CPU")
    raise ConfigError("quantize.backend", "the EXL2 backend is not implemented in this pipeline yet",
                      f"convert {model_dir} with exllamav2's convert.py at {bits_per_weight} bpw on the GPU machine, "
                      "or use the GGUF ladder (quantize=gguf)")
