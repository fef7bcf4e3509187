#!/usr/bin/env bash
# Build llama-cpp-python from its sdist once, install it into the venv, and unpack the matching
# converter (convert_hf_to_gguf.py, conversion/, gguf-py/) plus the llama-imatrix / llama-quantize
# tools next to it. Idempotent: a second run only re-installs the cached wheel (seconds).
#
#   scripts/build_llama_cpp.sh                # uses .venv/bin/python
#   PYTHON=/path/to/python scripts/build_llama_cpp.sh
#
# Why from source: PyPI has no llama-cpp-python wheels, only the sdist. Why GGML_NATIVE=OFF: the
# default -march=native build died with SIGILL in the AMX matmul on these CPUs. Why the converter
# from the SAME sdist: PyPI's gguf package has no converter and breaks this one; the converter and
# the library must come from one llama.cpp revision so that what we write is what we load.
# Why a cache outside the checkout: the build takes ~12 min on 2 cores; a fresh clone on the same
# machine reuses it. The tools build in the same (kept) cmake build dir, so only their own sources
# compile (the ggml/llama objects are reused).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
CACHE_ROOT="${DUS_LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dus-pipeline/llama-cpp}"
CACHE="$CACHE_ROOT/$LLAMA_CPP_PYTHON_VERSION"
SDIST_DIR="$CACHE_ROOT/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
SRC="$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
BUILD_DIR="$CACHE/cmake-build"
WHEEL_DIR="$CACHE/wheel"
CONVERTER_DIR="$CACHE/converter"
TOOLS_DIR="$CACHE/tools"
JOBS="${JOBS:-$(nproc)}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"

log() { printf '[build_llama_cpp] %s\n' "$*" >&2; }
started=$(date +%s)

if [[ ! -x "$PYTHON" ]]; then
  log "no python at $PYTHON: create the venv first (make setup) or set PYTHON="
  exit 2
fi
mkdir -p "$SDIST_DIR" "$CACHE"

# 1. The sdist, once.
if [[ ! -f "$SDIST" ]]; then
  log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
  tmp_dl="$(mktemp -d "$SDIST_DIR/.download.XXXXXX")"
  "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp_dl"
  mv "$tmp_dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" "$SDIST"
  rm -rf "$tmp_dl"
fi

# 2. Unpacked source, kept: the cmake build dir refers to it, and the converter comes from it.
if [[ ! -f "$SRC/.unpacked" ]]; then
  log "unpacking the sdist"
  rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
  tar -xzf "$SDIST" -C "$CACHE/src"
  touch "$SRC/.unpacked"
fi

# 3. The wheel, once (the long step). The build dir is kept so step 5 can reuse its objects.
wheel_path="$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel_path" ]]; then
  log "building the wheel (CMAKE_ARGS=$CMAKE_ARGS, $JOBS jobs); ~12 min on 2 cores"
  tmp_wheel="$(mktemp -d "$CACHE/.wheel.XXXXXX")"
  wheel_started=$(date +%s)
  "$PYTHON" -m pip wheel --no-deps -w "$tmp_wheel" \
    --config-settings=build-dir="$BUILD_DIR" "$SRC"
  log "wheel built in $(( $(date +%s) - wheel_started )) s"
  rm -rf "$WHEEL_DIR" && mv "$tmp_wheel" "$WHEEL_DIR"
  wheel_path="$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -n1)"
fi

# 4. Install (no-op when already installed at this version).
installed="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
if [[ "$installed" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
  log "installing $wheel_path"
  "$PYTHON" -m pip install --quiet "$wheel_path"
fi

# 5. Converter from the same sdist.
if [[ ! -f "$CONVERTER_DIR/.complete" ]]; then
  log "unpacking the converter"
  tmp_conv="$(mktemp -d "$CACHE/.converter.XXXXXX")"
  vendor="$SRC/vendor/llama.cpp"
  cp "$vendor/convert_hf_to_gguf.py" "$tmp_conv/"
  [[ -d "$vendor/conversion" ]] && cp -r "$vendor/conversion" "$tmp_conv/"
  cp -r "$vendor/gguf-py" "$tmp_conv/"
  touch "$tmp_conv/.complete"
  rm -rf "$CONVERTER_DIR" && mv "$tmp_conv" "$CONVERTER_DIR"
fi

# 6. llama-imatrix and llama-quantize (the only way to compute / apply an importance matrix: the
# Python binding takes the imatrix as a C++ map pointer, which ctypes cannot build). Optional: a
# failure here leaves the GGUF ladder usable without the IQ rungs.
if [[ ! -f "$TOOLS_DIR/.complete" ]]; then
  if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] && command -v cmake >/dev/null 2>&1; then
    cmake_bin="$(command -v cmake)"
    log "building llama-imatrix, llama-quantize, llama-perplexity in $BUILD_DIR"
    if "$cmake_bin" -DLLAMA_BUILD_TOOLS=ON "$BUILD_DIR" >/dev/null \
      && "$cmake_bin" --build "$BUILD_DIR" -j "$JOBS" --target llama-imatrix llama-quantize llama-perplexity; then
      tmp_tools="$(mktemp -d "$CACHE/.tools.XXXXXX")"
      for tool in llama-imatrix llama-quantize llama-perplexity; do
        found="$(find "$BUILD_DIR" -type f -name "$tool" -perm -u+x | head -n1)"
        [[ -n "$found" ]] && cp "$found" "$tmp_tools/"
      done
      # The tools link the shared libs of the build dir; keep copies next to them (rpath $ORIGIN
      # is not set on build-tree binaries, so the runner sets LD_LIBRARY_PATH to this dir).
      find "$BUILD_DIR" -name 'lib*.so*' \( -type f -o -type l \) -exec cp -P {} "$tmp_tools/" \;
      touch "$tmp_tools/.complete"
      rm -rf "$TOOLS_DIR" && mv "$tmp_tools" "$TOOLS_DIR"
    else
      log "the tools did not build: IQ rungs (imatrix) will be unavailable"
    fi
  else
    log "no cmake or no kept build dir: skipping the imatrix tools"
  fi
fi

log "done in $(( $(date +%s) - started )) s: wheel $wheel_path, converter $CONVERTER_DIR, tools $TOOLS_DIR"
