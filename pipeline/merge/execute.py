"""Execute a planned merge: stream tensor bytes from the sources into pre-laid-out output shards.

The plan fixes every output header and offset up front, so the writer walks the *sources* in file
order, reads each source tensor once and writes it to every output place it goes (a layer used by
two slices is read once). Plain copies go through ``copy_file_range`` (no pass through user space);
casts and ``scale`` are done with torch on bounded chunks. Memory stays flat whatever the model size.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_output_dir, disk_full_error, is_disk_full
from pipeline.fsutil import fmt_bytes
from pipeline.log import progress as progress_display
from pipeline.merge.config import MergeConfig
from pipeline.merge.plan import GENERATION_CONFIG, TOKENIZER_FILES, ResolvedMerge, TensorOp, validate_merge
from pipeline.merge.safetensors_io import COMPUTE_CHUNK, DTYPES, ByteCopier, write_all

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"


def run_merge(cfg: MergeConfig, out_dir: Path | str, *, base_model: str | None = None, allow_pickle: bool = False,
              trust_remote_code: bool = False, progress: bool = True, overwrite: bool = False,
              copy_mode: str = "auto") -> dict:
    """Merge as ``cfg`` says into ``out_dir`` (written under a temporary name, renamed when complete).

    ``InputSlice.model = None`` stands for ``base_model``. Raises ConfigError, before anything is
    written, on any problem the user can fix. Returns the merge's metrics.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan = validate_merge(cfg, base_model=base_model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    check_output_dir(plan, out_dir, overwrite=overwrite)
    for warning in plan.warnings:
        log.warning(warning)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(plan, tmp)
        stats = write_sharded(plan, tmp, progress=progress, copy_mode=copy_mode)
        write_index(plan, tmp)  # last: its presence means the shards are complete
    wall = time.perf_counter() - started
    metrics = {
        "merge_method": plan.spec.merge_method,
        "num_layers_in": {ref: src.num_layers for ref, src in plan.sources.items()},
        "num_hidden_layers": len(plan.layer_map),
        "num_parameters": plan.num_parameters,
        "bytes_read": stats["bytes_read"],
        "bytes_written": stats["bytes_written"],
        "wall_time_s": round(wall, 3),
        "write_time_s": round(stats["seconds"], 3),
        "throughput_mb_s": round(stats["bytes_written"] / 1e6 / max(stats["seconds"], 1e-9), 1),
        "layer_map": [[ls.model, ls.layer] for ls in plan.layer_map],
        "new_layers": plan.new_layers,
        "num_shards": len(plan.shards),
        "dtype": plan.out_config.get("dtype"),
        "copy_mode": stats["copy_mode"],
        "warnings": plan.warnings,
    }
    log.info("merged %d layers (%s) into %s: %.2f GB in %.1fs", metrics["num_hidden_layers"],
             plan.spec.merge_method, out_dir, metrics["bytes_written"] / 1e9, wall)
    return metrics


def check_output_dir(plan: ResolvedMerge, out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise ConfigError(str(out_dir), "already exists", "remove it or choose another output directory (or --overwrite)")
    resolved = out_dir.resolve()
    for src in plan.sources.values():
        if resolved == src.path.resolve() or src.path.resolve() in resolved.parents:
            raise ConfigError(str(out_dir), f"lies inside the source model directory {src.path}",
                              "write the merge somewhere else")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    free, need = shutil.disk_usage(parent).free, plan.bytes_to_write
    if free < need * 1.01:
        raise ConfigError(str(out_dir), f"the merge writes {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free there",
                          "free some space or write elsewhere")


def write_model_files(plan: ResolvedMerge, out: Path) -> None:
    """config.json, tokenizer files, generation_config.json, chat template, mergekit_config.yml."""
    (out / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    tok_dir = plan.tokenizer_dir
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, out / name)  # follows HF-cache symlinks
    for folder in (tok_dir, plan.donor.path):
        if folder is not None and (folder / GENERATION_CONFIG).is_file():
            shutil.copyfile(folder / GENERATION_CONFIG, out / GENERATION_CONFIG)
            break
    if plan.spec.chat_template:
        (out / "chat_template.jinja").write_text(plan.spec.chat_template)
    (out / MERGEKIT_CONFIG_NAME).write_text(plan.mergekit_yaml)


def write_index(plan: ResolvedMerge, out: Path) -> None:
    weight_map = {op.out_name: plan.shards[op.shard].file_name for op in plan.ops}
    index = {
        "metadata": {"total_size": sum(op.out_nbytes for op in plan.ops), "total_parameters": plan.num_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_sharded(plan: ResolvedMerge, out: Path, *, progress: bool = True, copy_mode: str = "auto") -> dict:
    """Write every output shard: headers first, then tensor data in source order."""
    started = time.perf_counter()
    copier = ByteCopier(copy_mode)
    out_fds: List[int] = []
    groups = _ops_by_source_tensor(plan.ops)
    bytes_read = 0
    writing = out  # the file being written when a write fails, for the error message
    try:
        for shard in plan.shards:
            writing = out / shard.file_name
            fd = os.open(writing, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            out_fds.append(fd)
            _preallocate(fd, shard.size)
            write_all(fd, shard.header, 0)
        with progress_display(total=sum(op.out_nbytes for op in plan.ops), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="merge", disable=not progress, mininterval=0.5) as bar:
            src_file, src_fd = None, -1
            for ops in groups:
                info, source = ops[0].src, ops[0].source
                writing = out / plan.shards[ops[0].shard].file_name
                _fault_injection_delay()
                if info.name in source.pickled:
                    _write_from_tensor(source.pickled[info.name], ops, out_fds, COMPUTE_CHUNK, bar)
                else:
                    if info.file != src_file:  # sources are walked file by file: each opened once
                        if src_fd >= 0:
                            os.close(src_fd)
                        src_file, src_fd = info.file, os.open(info.file, os.O_RDONLY)
                        _advise_sequential(src_fd)
                    _write_tensor(copier, src_fd, ops, out_fds, bar)
                bytes_read += info.nbytes
            if src_fd >= 0:
                os.close(src_fd)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(writing, e, fix=(
                f"free at least {fmt_bytes(plan.bytes_to_write)} there (or raise the file-size limit / quota), "
                "or write the merge to a bigger disk (paths.cache_dir, or the CLI's OUT_DIR)")) from e
        raise
    finally:
        for fd in out_fds:
            os.close(fd)
    return {
        "bytes_read": bytes_read,
        "bytes_written": sum(s.size for s in plan.shards),
        "seconds": time.perf_counter() - started,
        "copy_mode": copier.mode,
    }


# Tests only (tests/test_faults.py): seconds to sleep before each source tensor is written, so a
# test can kill the merge while it is writing. Never set it in real use.
FAULT_INJECTION_DELAY_ENV = "DUS_TEST_FAULT_MERGE_DELAY_S"


def _fault_injection_delay() -> None:
    delay = os.environ.get(FAULT_INJECTION_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _ops_by_source_tensor(ops: List[TensorOp]) -> List[List[TensorOp]]:
    """Group output tensors by the source tensor they come from, in source file/offset order."""
    groups: Dict[tuple, List[TensorOp]] = OrderedDict()
    for op in ops:
        groups.setdefault((op.source.ref, op.src.name), []).append(op)
    return sorted(groups.values(), key=lambda g: (str(g[0].src.file), g[0].src.begin))


def _write_tensor(copier: ByteCopier, src_fd: int, ops: List[TensorOp], out_fds: List[int], bar) -> None:
    info = ops[0].src
    if all(op.is_copy for op in ops):
        for op in ops:
            copier.copy(src_fd, info.begin, out_fds[op.shard], op.offset, info.nbytes)
            bar.update(info.nbytes)
        return
    # Some destination needs a cast/scale: read bounded chunks once, transform per destination.
    itemsize = DTYPES[info.dtype][0]
    step = max(itemsize, COMPUTE_CHUNK // itemsize * itemsize)
    buf = copier.compute_buffer()
    pos = 0
    while pos < info.nbytes:
        n = min(step, info.nbytes - pos)
        _pread_exact(src_fd, buf[:n], info.begin + pos)
        for op in ops:
            data = buf[:n] if op.is_copy else _transform(_frombuffer(buf[:n], info.dtype), op)
            out_pos = pos // itemsize * DTYPES[op.out_dtype][0]
            write_all(out_fds[op.shard], data, op.offset + out_pos)
            bar.update(len(data) if op.is_copy else data.nbytes)
        pos += n


def _write_from_tensor(tensor, ops: List[TensorOp], out_fds: List[int], chunk: int, bar) -> None:
    """Pickle sources (allow_pickle): the tensor is memory-mapped by torch.load; write it in chunks."""
    flat = tensor.reshape(-1)
    step = max(1, chunk // max(1, tensor.element_size()))
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step].contiguous()
        for op in ops:
            data = part.view(_torch().uint8).numpy() if op.is_copy else _transform(part, op)
            write_all(out_fds[op.shard], data, op.offset + start * DTYPES[op.out_dtype][0])
            bar.update(data.nbytes)


def _transform(x, op: TensorOp):
    """mergekit's order: cast to ``dtype``, multiply by ``scale``, cast to ``out_dtype``. All
    elementwise, so doing it chunk by chunk gives the same bits as on the whole tensor."""
    torch = _torch()
    if op.compute_dtype and op.compute_dtype != op.src.dtype:
        x = x.to(getattr(torch, DTYPES[op.compute_dtype][1]))
    if op.scale is not None:
        x = x * op.scale
    out = getattr(torch, DTYPES[op.out_dtype][1])
    if x.dtype != out:
        x = x.to(out)
    return x.contiguous().view(torch.uint8).numpy()


def _frombuffer(view: memoryview, code: str):
    torch = _torch()
    return torch.frombuffer(view, dtype=getattr(torch, DTYPES[code][1]))


def _torch():
    import torch  # only needed for casts/scales and pickle sources; plain merges never touch it

    return torch


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of source file at offset {offset}")
        view, offset = view[n:], offset + n


def _preallocate(fd: int, size: int) -> None:
    """Reserve the shard's blocks up front: fails fast on a full disk, keeps the file contiguous."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # pragma: no cover - non-Linux
        pass


def _advise_sequential(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):  # pragma: no cover - advice only
        pass
