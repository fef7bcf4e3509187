#!/usr/bin/env python
"""Benchmark the merge against the raw I/O floor of the same disk (and mergekit-yaml, if given).

Builds a synthetic Mistral-shaped checkpoint (random bfloat16, sharded ~5 GB like hub checkpoints),
then runs, interleaved and ``--repeats`` times each:

* ``floor``: read the input bytes once and write the output's byte count once with plain file
  copies (``copy_file_range``): each input shard is copied, and each 256 MiB chunk is copied a
  second time right away (still in the page cache) until the output's byte count is reached; all
  fsync'd. The least I/O any merge can do, done the fastest way this kernel offers;
* ``ours``: ``python -m pipeline.merge`` (fsync'd, atomically renamed);
* ``mergekit``: ``mergekit-yaml`` on the same YAML (``--mergekit-python``, a separate venv), and
  the fsync of its output timed separately (mergekit does not fsync).

Each run is a child process: wall time from the parent, peak RSS from ``/usr/bin/time``. Before
every timed run the inputs are made cold (``--cache cold``, the default): ``sync``, then
``posix_fadvise(DONTNEED)`` on every input file (no privilege needed; other users' cached files
stay), or ``--drop-caches`` (root: ``echo 3 > /proc/sys/vm/drop_caches``, the whole machine's cache).
The bytes of input still cached are measured with ``fincore`` and printed with each run. Floor and
ours alternate (the order flips every repetition), so the ratio of each pair is taken under the
same load; the summary gives medians, min-max, and the median of the paired ratios.

    python scripts/bench_merge.py --shape small --repeats 7
    python scripts/bench_merge.py --shape small --repeats 3 --mergekit-python /tmp/mk-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # ~3.6 GB: a TinyLlama-sized model with full multi-head attention
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32768),
    # Mistral-7B-v0.1: 14.5 GB -> 21.5 GB with [0, 24) + [8, 32)
    "mistral7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000),
}
SHARD_BYTES = 5 * 10**9


def mistral_tensors(shape: dict) -> list[tuple[str, list[int]]]:
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    out = [("model.embed_tokens.weight", [v, h])]
    for layer in range(L):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [h, h]),
                (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                (p + "self_attn.o_proj.weight", [h, h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                (p + "mlp.down_proj.weight", [h, i])]
    return out + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def build_checkpoint(path: Path, shape: dict) -> int:
    """Random bf16 tensors in ~5 GB shards + index + config + a tiny tokenizer. Returns bytes."""
    import torch

    from pipeline.merge.safetensors_io import ShardEntry, layout_shard, write_all
    from pipeline.merge.testing import make_tiny_tokenizer

    path.mkdir(parents=True)
    torch.manual_seed(0)
    block = torch.randn(32 << 20, dtype=torch.bfloat16).view(torch.uint8).numpy()  # 64 MiB, reused
    groups, size = [[]], 0
    for name, dims in mistral_tensors(shape):
        nbytes = math.prod(dims) * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(ShardEntry(name, "BF16", tuple(dims), nbytes))
        size += nbytes
    weight_map, total = {}, 0
    for k, entries in enumerate(groups):
        layout = layout_shard(f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors", entries)
        fd = os.open(path / layout.file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, layout.header, 0)
            pos, end = len(layout.header), layout.size
            while pos < end:
                n = min(len(block), end - pos)
                write_all(fd, block[:n], pos)
                pos += n
            os.fsync(fd)
        finally:
            os.close(fd)
        weight_map.update({e.name: layout.file_name for e in entries})
        total += layout.size
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                  tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1, eos_token_id=2, **shape)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    make_tiny_tokenizer(path, vocab_size=256)
    return total


FLOOR_CHILD = r"""
import os, sys
from pathlib import Path
src, dst, out_bytes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir()
inputs = sorted(src.glob("*.safetensors"))
in_bytes = sum(f.stat().st_size for f in inputs)
extra = out_bytes - in_bytes  # output bytes beyond one copy of the input
CHUNK = 256 << 20

def copy(a, b, off, n):
    while n:
        done = os.copy_file_range(a, b, n, off)
        off, n = off + done, n - done

with open(dst / "extra", "wb") as e:
    for f in inputs:
        with open(f, "rb") as a, open(dst / f.name, "wb") as b:
            size = os.fstat(a.fileno()).st_size
            for off in range(0, size, CHUNK):
                n = min(CHUNK, size - off)
                copy(a.fileno(), b.fileno(), off, n)  # every input byte read from disk once
                if extra > 0:  # and, while still in the page cache, copied again for the extra bytes
                    m = min(n, extra)
                    copy(a.fileno(), e.fileno(), off, m)
                    extra -= m
for p in dst.iterdir():
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

FSYNC_CHILD = r"""
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for n in files:
        fd = os.open(os.path.join(root, n), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time of ``cmd`` and its peak RSS. The RSS comes from /usr/bin/time, a small process that
    forks it: the getrusage of a child forked by *this* process would report at least this
    process's own RSS (ru_maxrss survives fork+exec), i.e. that of torch used to build inputs."""
    load = Path("/proc/loadavg").read_text().split()[0]
    rss_file = Path(f"/tmp/.bench-rss-{os.getpid()}")
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr).decode()[-3000:]}")
    peak_kib = int(rss_file.read_text().split()[-1])
    rss_file.unlink()
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024, "loadavg_before": float(load)}


def warm_page_cache(src: Path) -> None:
    """Read the inputs once, untimed (``--cache warm``): every method starts with them cached, as far
    as memory allows."""
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def evict_page_cache(src: Path, *, drop_all: bool) -> None:
    """Make the inputs cold: write back whatever is dirty (an earlier run's deletions included),
    then drop the inputs' cached pages, or the whole page cache with ``drop_all`` (root only)."""
    os.sync()
    if drop_all:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for f in sorted(src.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(src: Path) -> int | None:
    """Bytes of the input files in the page cache (``fincore``, util-linux), or None without it."""
    files = [str(f) for f in sorted(src.glob("*.safetensors"))]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split())


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES) + ["both"], default="small")
    ap.add_argument("--workdir", default="/tmp/dus-merge-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-python", default=None, help="python of a venv with mergekit installed")
    ap.add_argument("--mergekit-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--keep", action="store_true",
                    help="keep the synthetic checkpoints (and reuse them when they are already there)")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold",
                    help="cold: the inputs are evicted from the page cache before every run (default); "
                         "warm: read once before the runs")
    ap.add_argument("--drop-caches", action="store_true",
                    help="with --cache cold: drop the whole page cache (root) instead of the inputs' pages")
    ap.add_argument("--json", default=None, help="write all measurements here")
    args = ap.parse_args()

    shapes = sorted(SHAPES) if args.shape == "both" else [args.shape]
    work = Path(args.workdir)
    if args.drop_caches and os.geteuid() != 0:
        ap.error("--drop-caches needs root (writes /proc/sys/vm/drop_caches); leave it out to evict only the inputs")
    results = {"cache": args.cache, "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                           "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                           "python": platform.python_version()}, "runs": {}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    try:
        for shape_name in shapes:
            src = work / shape_name / "src"
            built = work / shape_name / "src.built.json"  # written last: the checkpoint is complete
            if args.keep and built.is_file() and json.loads(built.read_text()) == SHAPES[shape_name]:
                in_bytes = dir_bytes(src, "*.safetensors")
                print(f"[{shape_name}] reusing {src}", flush=True)
            else:
                shutil.rmtree(work / shape_name, ignore_errors=True)
                print(f"[{shape_name}] building {src} ...", flush=True)
                in_bytes = build_checkpoint(src, SHAPES[shape_name])
                built.write_text(json.dumps(SHAPES[shape_name]))
            yml = work / shape_name / "merge.yml"
            yml.write_text(f"slices:\n  - sources:\n      - model: {src}\n        layer_range: [0, 24]\n"
                           f"  - sources:\n      - model: {src}\n        layer_range: [8, 32]\n"
                           "merge_method: passthrough\ndtype: bfloat16\n")
            runs = {"floor": [], "ours": [], "mergekit": [], "mergekit_fsync": []}

            def prepare() -> dict:
                if args.cache == "cold":
                    evict_page_cache(src, drop_all=args.drop_caches)
                cached = cached_bytes(src)
                return {"input_cached_bytes": cached}

            def run_ours() -> None:
                nonlocal out_bytes
                out = work / shape_name / "out"
                shutil.rmtree(out, ignore_errors=True)
                pre = prepare()
                r = run_child([sys.executable, "-m", "pipeline.merge", str(yml), str(out), "--no-progress",
                               "--metrics-json", str(work / shape_name / "metrics.json")], env)
                metrics = json.loads((work / shape_name / "metrics.json").read_text())
                r.update(bytes_read=metrics["bytes_read"], bytes_written=metrics["bytes_written"],
                         copy_mode=metrics["copy_mode"], merge_wall_s=metrics["wall_time_s"])
                out_bytes = metrics["bytes_written"]
                r.update(pre)
                runs["ours"].append(r)
                print(f"[{shape_name}] ours: {r}", flush=True)
                shutil.rmtree(out)

            def run_floor() -> None:
                floor = work / shape_name / "floor"
                shutil.rmtree(floor, ignore_errors=True)
                pre = prepare()
                r = run_child([sys.executable, "-c", FLOOR_CHILD, str(src), str(floor), str(out_bytes)], env)
                r.update(bytes_read=in_bytes, bytes_written=dir_bytes(floor), **pre)
                runs["floor"].append(r)
                print(f"[{shape_name}] floor: {r}", flush=True)
                shutil.rmtree(floor)

            def run_mergekit() -> None:
                if not args.mergekit_python or len(runs["mergekit"]) >= (args.mergekit_repeats or args.repeats):
                    return
                mk = work / shape_name / "mk"
                shutil.rmtree(mk, ignore_errors=True)
                pre = prepare()
                mk_bin = Path(args.mergekit_python).parent / "mergekit-yaml"
                r = run_child([str(mk_bin), str(yml), str(mk), "--no-copy-tokenizer", "--out-shard-size", "5B"],
                              {**env, "PYTHONPATH": ""})
                r.update(bytes_written=dir_bytes(mk, "*.safetensors"), **pre)
                runs["mergekit"].append(r)
                s = run_child([sys.executable, "-c", FSYNC_CHILD, str(mk)], env)
                runs["mergekit_fsync"].append(s)
                print(f"[{shape_name}] mergekit: {r} (+fsync {s['wall_s']:.1f}s)", flush=True)
                shutil.rmtree(mk)

            if args.cache == "warm":
                warm_page_cache(src)
            out_bytes = None
            run_ours()  # untimed warm-up (imports, dentries): also fixes the output size the floor must write
            runs["ours"].clear()
            order = [run_floor, run_ours, run_mergekit]
            for rep in range(args.repeats):  # alternate: floor first on even repetitions, ours first on odd
                for fn in (order if rep % 2 == 0 else [run_ours, run_floor, run_mergekit]):
                    fn()
            results["runs"][shape_name] = {"input_bytes": in_bytes, "output_bytes": out_bytes, **runs}
            summarize(shape_name, results["runs"][shape_name])
            if not args.keep:
                shutil.rmtree(work / shape_name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def summarize(name: str, r: dict) -> None:
    med = {k: statistics.median(x["wall_s"] for x in v) for k, v in r.items() if isinstance(v, list) and v}
    rss = {k: max(x["peak_rss_mib"] for x in v) for k, v in r.items() if isinstance(v, list) and v}
    print(f"\n== {name}: {r['input_bytes'] / 1e9:.2f} GB in -> {r['output_bytes'] / 1e9:.2f} GB out")
    for k in med:
        walls = [x["wall_s"] for x in r[k]]
        ratio = med[k] / med["floor"]
        print(f"  {k:15s} median wall {med[k]:7.2f}s  (min {min(walls):.2f}, max {max(walls):.2f})  "
              f"{ratio:.3f}x floor  peak RSS {rss[k]:5.0f} MiB  runs {[round(w, 2) for w in walls]}")
    # Each repetition ran floor and ours back to back: their ratio is taken under the same load.
    pairs = [o["wall_s"] / f["wall_s"] for o, f in zip(r["ours"], r["floor"])]
    if pairs:
        print(f"  ours/floor paired ratios {[round(x, 3) for x in pairs]}: median {statistics.median(pairs):.3f}x "
              f"(min {min(pairs):.3f}, max {max(pairs):.3f})")
    loads = [x["loadavg_before"] for v in r.values() if isinstance(v, list) for x in v]
    cached = [x.get("input_cached_bytes") for v in r.values() if isinstance(v, list) for x in v]
    if loads:
        print(f"  1-min load average before the runs: {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs")
    if cached and all(c is not None for c in cached):
        print(f"  input bytes in the page cache at each start: at most {max(cached) / 2**20:.0f} MiB")
    if "mergekit" in med and "mergekit_fsync" in med:
        print(f"  mergekit+fsync  median wall {med['mergekit'] + med['mergekit_fsync']:7.1f}s  "
              f"({(med['mergekit'] + med['mergekit_fsync']) / med['floor']:.2f}x floor)")


if __name__ == "__main__":
    main()
