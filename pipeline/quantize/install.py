"""Where llama.cpp lives: the llama-cpp-python wheel in the venv, and the converter and tools that
``scripts/build_llama_cpp.sh`` unpacked from the same sdist into a cache outside the checkout.

The converter must come from the same llama.cpp revision as the library that loads its output;
PyPI's ``gguf`` package is older and breaks it, so the converter runs in a subprocess with the
vendored ``gguf-py`` first on ``PYTHONPATH`` and never in this process.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.errors import ConfigError

BUILD_SCRIPT = "scripts/build_llama_cpp.sh"
DEFAULT_VERSION = "0.3.36"


def llama_cpp_cache_root() -> Path:
    """The build script's cache (``$DUS_LLAMA_CPP_CACHE`` or ``$XDG_CACHE_HOME/dus-pipeline/llama-cpp``)."""
    if os.environ.get("DUS_LLAMA_CPP_CACHE"):
        return Path(os.environ["DUS_LLAMA_CPP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dus-pipeline" / "llama-cpp"


@dataclass(frozen=True)
class LlamaCppInstall:
    version: str
    converter_script: Path      # convert_hf_to_gguf.py
    gguf_py: Path               # the vendored gguf-py package root (goes on PYTHONPATH)
    tools_dir: Path | None      # llama-imatrix (and friends) when the build script could build them
    vocab_dir: Path | None      # vendor/llama.cpp/models: the ggml-vocab-*.gguf test vocabularies

    @property
    def imatrix_tool(self) -> Path | None:
        if self.tools_dir is None:
            return None
        tool = self.tools_dir / "llama-imatrix"
        return tool if tool.is_file() else None

    def converter_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.gguf_py), str(self.converter_script.parent)]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # The converter must not reach for the Hub (offline machines; and no hidden downloads).
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def tool_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.tools_dir is not None:
            # Build-tree binaries find the shared libs copied next to them only through this.
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(self.tools_dir)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        return env


def _not_installed(problem: str) -> ConfigError:
    return ConfigError("quantize (llama.cpp)", problem,
                       f"run {BUILD_SCRIPT} (builds llama-cpp-python {DEFAULT_VERSION} from its sdist once, ~12 min on "
                       "2 cores, installs it into the venv and unpacks the matching converter)")


def find_llama_cpp() -> LlamaCppInstall:
    """The installed llama.cpp pieces, or a ConfigError saying to run the build script."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise _not_installed("llama-cpp-python is not installed in this Python environment") from None
    root = llama_cpp_cache_root() / version
    converter = root / "converter"
    if not (converter / ".complete").is_file() or not (converter / "convert_hf_to_gguf.py").is_file():
        raise _not_installed(f"llama-cpp-python {version} is installed but its converter is not unpacked in {converter}")
    tools = root / "tools"
    vocab = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "models"
    return LlamaCppInstall(
        version=version, converter_script=converter / "convert_hf_to_gguf.py", gguf_py=converter / "gguf-py",
        tools_dir=tools if (tools / ".complete").is_file() else None,
        vocab_dir=vocab if vocab.is_dir() else None)


def import_llama_cpp():
    """``import llama_cpp`` with the install check's message instead of an ImportError."""
    find_llama_cpp()
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # OSError: the shared library failed to load
        raise _not_installed(f"llama_cpp failed to import ({type(e).__name__}: {e})") from None
    return llama_cpp


@lru_cache(maxsize=4)
def converter_architectures(converter_dir: str) -> frozenset[str]:
    """The HF ``architectures`` names the converter can convert to a text model (its own registry,
    read in a subprocess with the vendored gguf-py, as the conversion itself will run)."""
    install = find_llama_cpp()
    snippet = "import conversion, sys; sys.stdout.write('\\n'.join(sorted(conversion.TEXT_MODEL_MAP)))"
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=converter_dir, env=install.converter_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise ConfigError("quantize (llama.cpp)", f"the converter failed to list its architectures: {proc.stderr.strip()[-500:]}",
                          f"re-run {BUILD_SCRIPT}")
    return frozenset(line.strip() for line in proc.stdout.splitlines() if line.strip())
