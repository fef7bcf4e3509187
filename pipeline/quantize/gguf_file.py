"""What a written GGUF file really holds: the share of parameters stored in each tensor type, and
which rungs of a ladder came out as the very same file.

A rung's name is the type llama.cpp was asked for, not what it wrote: k-quants need rows that are
a multiple of 256, and llama.cpp falls back to older types for every tensor whose rows are not
(SmolLM2's 576-wide tensors: its "Q4_K_M" is mostly Q5_0 and Q8_0; the demo's 128-wide ones: its
"Q6_K" is the same file as its Q8_0). So the tables read the types back from the file itself, with
the ``gguf`` package's reader (memory-mapped: only the tensor directory is read).
"""

from __future__ import annotations

from pathlib import Path


def tensor_type_mix(path: Path | str) -> dict[str, float]:
    """{GGML type name: share of the file's parameters stored in it}, largest share first."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def format_type_mix(mix: dict[str, float] | None, *, most: int = 4) -> str:
    """``"58% Q5_0, 22% Q8_0, 11% Q4_K, 9% Q6_K"`` (the ``most`` largest; the rest as "+ N more")."""
    if not mix:
        return "–"
    items = list(mix.items())
    shown = ", ".join(f"{share:.0%} {name}" if share >= 0.005 else f"<1% {name}" for name, share in items[:most])
    return shown + (f" + {len(items) - most} more" if len(items) > most else "")


def mark_identical_rungs(rungs: list[dict]) -> None:
    """Set ``same_file_as`` on every rung whose file has the same bytes (records carry the file's
    ``sha256``) as a rung listed before it: the label of that first rung, else None."""
    first_with: dict[str, str] = {}
    for r in rungs:
        digest = r.get("sha256")
        r["same_file_as"] = first_with.get(digest) if digest else None
        if digest:
            first_with.setdefault(digest, r["label"])
