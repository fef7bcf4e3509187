"""Safetensors read/write at the byte level, without loading tensors.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``; the header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data section.
Parsing it ourselves lets the merge copy each tensor's bytes from source to output by offset
(in the kernel where possible), so memory use does not grow with the model.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pipeline.errors import ConfigError

# safetensors dtype code -> (bytes per element, torch dtype name, is floating point)
DTYPES: Dict[str, Tuple[int, str, bool]] = {
    "F64": (8, "float64", True),
    "F32": (4, "float32", True),
    "F16": (2, "float16", True),
    "BF16": (2, "bfloat16", True),
    "F8_E4M3": (1, "float8_e4m3fn", True),
    "F8_E5M2": (1, "float8_e5m2", True),
    "I64": (8, "int64", False),
    "I32": (4, "int32", False),
    "I16": (2, "int16", False),
    "I8": (1, "int8", False),
    "U8": (1, "uint8", False),
    "BOOL": (1, "bool", False),
}
TORCH_NAME_TO_CODE = {v[1]: k for k, v in DTYPES.items()}

# A real header is a few MB at most (one JSON entry per tensor); anything bigger is corruption.
MAX_HEADER_BYTES = 100 << 20
HEADER_ALIGN = 8
COPY_CHUNK = 64 << 20
# Casts/scales hold ~4 chunk-sized temporaries (source, cast, scaled, output): keep them small so
# peak memory stays near torch's own footprint (~230 MB) instead of growing with the chunk.
COMPUTE_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file`` at absolute offsets ``[begin, end)``."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: Tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """Parse and check a safetensors header; ConfigError (naming the file) if truncated/corrupt."""
    size = path.stat().st_size

    def corrupt(problem: str) -> ConfigError:
        return ConfigError(str(path), f"not a valid safetensors file: {problem}",
                           "re-download or re-save this checkpoint file")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise corrupt(f"header length {n} does not fit in the {size}-byte file (truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    out: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"malformed entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise corrupt(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise corrupt(f"tensor {name!r} data_offsets {[begin, end]} lie outside the "
                          f"{data_len}-byte data section (truncated file?)")
        if end - begin != math.prod(shape) * DTYPES[dtype][0]:
            raise corrupt(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} {dtype}")
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return out


@dataclass
class ShardEntry:
    """One tensor of an output shard: its header entry and its byte offset in the file."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int
    offset: int = -1  # absolute, set by ``layout_shard``


@dataclass
class ShardLayout:
    file_name: str
    entries: List[ShardEntry]
    header: bytes = b""
    size: int = 0


def layout_shard(file_name: str, entries: List[ShardEntry], metadata: Optional[Dict[str, str]] = None) -> ShardLayout:
    """Fix the header bytes and every tensor's absolute offset before any data is written.

    All sizes are known from the plan, so the header goes first and data can be written to its
    final place in any order (the merge writes in source order to read each input byte once).
    """
    header: Dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        e.offset = pos
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGN)  # data section 8-byte aligned, as safetensors does
    data_start = 8 + len(raw)
    for e in entries:
        e.offset += data_start
    return ShardLayout(file_name, entries, struct.pack("<Q", len(raw)) + raw, data_start + pos)


def parse_size(value: str | int, where: str) -> int:
    """mergekit's ``parse_kmb``: an integer, or a number with a K/M/B suffix (powers of 1000)."""
    if isinstance(value, bool):
        raise ConfigError(where, f"expected a size like '5B', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        mult = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
        number = text[:-1] if mult != 1 else text
        try:
            n = int(float(number) * mult)
        except ValueError:
            raise ConfigError(where, f"expected a size like '5B', '500M' or an integer, got {value!r}") from None
    if n <= 0:
        raise ConfigError(where, f"size must be positive, got {value!r}")
    return n


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class ByteCopier:
    """Copies byte ranges between files: ``copy_file_range`` (no copy through user space) when
    the kernel and filesystem allow, else ``pread``/``pwrite`` through one reused buffer."""

    def __init__(self, mode: str = "auto", chunk: int = COPY_CHUNK):
        self.kernel = mode in ("auto", "kernel") and hasattr(os, "copy_file_range")
        self.chunk = chunk
        self._buf: Optional[bytearray] = None
        self._compute_buf: Optional[bytearray] = None

    @property
    def mode(self) -> str:
        return "copy_file_range" if self.kernel else "pread/pwrite"

    def buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = bytearray(self.chunk)
        return memoryview(self._buf)

    def compute_buffer(self) -> memoryview:
        """The smaller buffer source chunks are read into when they must be cast or scaled."""
        if self._compute_buf is None:
            self._compute_buf = bytearray(COMPUTE_CHUNK)
        return memoryview(self._compute_buf)

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
        while n > 0 and self.kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, min(n, 1 << 30), src_off, dst_off)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    self.kernel = False  # e.g. across filesystems on old kernels: fall back for good
                    break
                raise
            if done == 0:
                raise OSError(errno.EIO, f"unexpected end of source file at offset {src_off}")
            src_off, dst_off, n = src_off + done, dst_off + done, n - done
        buf = self.buffer() if n > 0 else None
        while n > 0:
            got = os.preadv(src_fd, [buf[: min(n, self.chunk)]], src_off)
            if got == 0:
                raise OSError(errno.EIO, f"unexpected end of source file at offset {src_off}")
            write_all(dst_fd, buf[:got], dst_off)
            src_off, dst_off, n = src_off + got, dst_off + got, n - got
