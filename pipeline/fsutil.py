"""Filesystem helpers: atomic output directories and content hashing.

Every output directory is written under a hidden temporary name next to its final location and
renamed only when complete, so a crash never leaves something a later stage could take for a
finished result (``os.rename`` is atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from pipeline.errors import ConfigError

PARTIAL_SUFFIX = ".partial"

# errno of a write that failed for lack of room: disk full, over the file-size limit
# (RLIMIT_FSIZE, a filesystem's maximum file size), over a quota.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# The same errors as safetensors reports them (a Rust IoError, wrapped in its own exception type).
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded")
# torch.save's C++ stream writer loses the errno: a failed write reads "basic_ios::clear: iostream
# error" / "unexpected pos" / "file write failed". Nearly always a full disk or a size limit; the
# message says "most likely" and gives the free space measured there at that moment.
_WRITE_FAILED_TEXT = ("iostream error", "unexpected pos", "file write failed")


class DiskFullError(ConfigError):
    """A write failed for lack of space. A ConfigError: the user fixes it (space, paths, limits),
    and the CLIs print it as one line with exit code 2."""


def _chain(exc: BaseException | None, depth: int = 0) -> Iterator[BaseException]:
    if exc is None or depth > 8:
        return
    yield exc
    yield from _chain(exc.__cause__ or exc.__context__, depth + 1)


def is_disk_full(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if not isinstance(e, OSError) and any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
    return False


def _is_failed_write(exc: BaseException) -> bool:
    return any(not isinstance(e, OSError) and any(t in str(e) for t in _WRITE_FAILED_TEXT) for e in _chain(exc))


def _free_space_note(path: Path | str) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        note = f"{shutil.disk_usage(p).free / 1e9:.2f} GB free there now"
    except OSError:
        return ""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        note += f", file-size limit {soft} bytes (ulimit -f)"
    return "; " + note


def disk_full_error(path: Path | str, exc: BaseException, *, fix: str | None = None,
                    certain: bool = True) -> DiskFullError:
    root = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS), None)
    first = root or exc
    cause = first.strerror if isinstance(first, OSError) and first.strerror else str(first).splitlines()[0][:200]
    what = "disk full / file too large" if certain else "write failed, most likely disk full / file too large"
    return DiskFullError(
        str(path), f"{what} while writing ({type(first).__name__}: {cause}{_free_space_note(path)})",
        fix or "free space on that filesystem (or raise the file-size limit / quota), or write to a bigger disk: "
               "paths.output_root, paths.cache_dir; fewer checkpoints: cpt.save_total_limit, sft.save_total_limit")


@contextlib.contextmanager
def disk_full_guard(path: Path | str, *, fix: str | None = None) -> Iterator[None]:
    """Turn a failed write for lack of space inside the block into a ``DiskFullError`` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise their own types for ENOSPC
        if is_disk_full(e):
            raise disk_full_error(path, e, fix=fix) from e
        if _is_failed_write(e):
            raise disk_full_error(path, e, fix=fix, certain=False) from e
        raise


def partial_dir_for(final: Path) -> Path:
    return final.parent / f".{final.name}{PARTIAL_SUFFIX}"


@contextlib.contextmanager
def atomic_output_dir(final: Path | str, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; rename it to ``final`` if the block succeeds.

    On an exception the temporary directory is removed and ``final`` is left untouched; a write
    that failed for lack of space becomes a ``DiskFullError`` naming the directory. A process killed
    outright leaves only the ``.partial`` directory, which the next attempt removes first.
    ``resume``: the ``.partial`` directory of an earlier attempt is kept (also on an exception) and
    yielded again, for a writer that records what each of its files was made from and redoes only
    what is missing or stale (the quantize ladder).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or choose another output path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir_for(final)
    if tmp.exists() and not resume:  # left by an earlier crash
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=resume)
    try:
        with disk_full_guard(tmp):
            yield tmp
            fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        if not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Populate ``dst`` with ``src``'s files: hard links where possible (no extra disk), else copies."""
    for dirpath, _, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            s, d = Path(dirpath) / name, dst / rel / name
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """An exclusive inter-process lock (e.g. two sweep jobs building the same cached merge)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path | str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files whose content does not define a model/dataset (our own bookkeeping, logs, plots).
_HASH_EXCLUDE_NAMES = {"manifest.json"}
_HASH_EXCLUDE_DIRS = {"logs", "checkpoints", ".cache"}


def hash_path(path: Path | str) -> str:
    """Content hash of a file, or of a directory's files (relative names + bytes).

    Large files are hashed once per (path, size, mtime) and remembered in a cache beside the
    user's cache dir, so re-runs and sweeps do not re-read multi-GB checkpoints.
    """
    path = Path(path)
    if path.is_file():
        return _cached_file_hash(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or p.name in _HASH_EXCLUDE_NAMES or rel.parts[0] in _HASH_EXCLUDE_DIRS:
            continue
        h.update(str(rel).encode() + b"\0" + _cached_file_hash(p).encode() + b"\n")
    return h.hexdigest()


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_HASH_CACHE_FILE = Path(os.environ.get("DUS_HASH_CACHE", Path.home() / ".cache" / "dus-pipeline" / "file_hashes.json"))
_hash_cache: dict | None = None


def _cached_file_hash(p: Path) -> str:
    global _hash_cache
    st = p.stat()
    if st.st_size < (64 << 20):
        return sha256_file(p)
    if _hash_cache is None:
        try:
            _hash_cache = json.loads(_HASH_CACHE_FILE.read_text())
        except (OSError, ValueError):
            _hash_cache = {}
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(p)
        try:
            _HASH_CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(_HASH_CACHE_FILE, _hash_cache)
        except OSError:
            pass  # a read-only home only costs re-hashing
    return _hash_cache[key]


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 0.01 * 1e9 else f"{n / 1e6:.2f} MB"
