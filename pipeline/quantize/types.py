"""The GGUF quantization types the ladder can make, as data.

``approx_bpw`` is only for the disk estimate before anything is made: bits per weight of the whole
file for Llama-3-8B as llama.cpp's own ``llama-quantize --help`` lists them (size in GiB x 8 /
8.03e9 parameters), or the type's nominal bpw where llama.cpp gives only that. Small models come
out larger per weight (their embeddings are a bigger share and are kept at higher precision), so
the estimate adds a margin. The measured bpw of every rung is in the ladder's results.

``needs_imatrix``: llama.cpp refuses these without an importance matrix (``tensor_requires_imatrix``
in ``src/llama-quant.cpp``: IQ1_*, IQ2_XXS/XS/S and IQ3_XXS tensors, and Q2_K inside Q2_K_S; IQ2_M
and IQ3_XS files contain such tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import DEFAULT_QUANT_LADDER
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class QuantType:
    name: str             # as llama-quantize spells it, and as LLAMA_FTYPE_MOSTLY_<name> / LLAMA_FTYPE_ALL_F32
    approx_bpw: float
    needs_imatrix: bool = False


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in [
    QuantType("IQ1_S", 1.56, True),
    QuantType("IQ1_M", 1.75, True),
    QuantType("IQ2_XXS", 2.06, True),
    QuantType("IQ2_XS", 2.31, True),
    QuantType("IQ2_S", 2.5, True),
    QuantType("IQ2_M", 2.7, True),
    QuantType("Q2_K_S", 3.17, True),
    QuantType("Q2_K", 3.17),
    QuantType("IQ3_XXS", 3.06, True),
    QuantType("IQ3_XS", 3.3, True),
    QuantType("IQ3_S", 3.44),
    QuantType("IQ3_M", 3.66),
    QuantType("Q3_K_S", 3.65),
    QuantType("Q3_K_M", 4.0),
    QuantType("Q3_K_L", 4.31),
    QuantType("IQ4_XS", 4.25),
    QuantType("IQ4_NL", 4.5),
    QuantType("Q4_0", 4.64),
    QuantType("Q4_1", 5.11),
    QuantType("Q4_K_S", 4.67),
    QuantType("Q4_K_M", 4.90),
    QuantType("Q5_0", 5.57),
    QuantType("Q5_1", 6.04),
    QuantType("Q5_K_S", 5.57),
    QuantType("Q5_K_M", 5.70),
    QuantType("Q6_K", 6.56),
    QuantType("Q8_0", 8.5),
    QuantType("F16", 16.0),
    QuantType("BF16", 16.0),
    QuantType("F32", 32.0),
]}

# What the model this project imitates shipped, minus the rungs that need calibration data.
DEFAULT_LADDER = DEFAULT_QUANT_LADDER  # the config default (pipeline.config), as the library default too
# Unquantized GGUF types the converter writes (the reference every rung is scored against).
REFERENCE_TYPES = ("F32", "F16", "BF16")
IMATRIX_SUFFIX = "+imatrix"


@dataclass(frozen=True)
class Rung:
    """One file of the ladder: a quant type, with or without an importance matrix."""

    quant: QuantType
    use_imatrix: bool

    @property
    def label(self) -> str:
        # A type that cannot exist without an imatrix is named plainly; an optional one is marked.
        return self.quant.name + (IMATRIX_SUFFIX if self.use_imatrix and not self.quant.needs_imatrix else "")

    def file_name(self, stem: str) -> str:
        suffix = "-imat" if self.use_imatrix and not self.quant.needs_imatrix else ""
        return f"{stem}-{self.quant.name}{suffix}.gguf"


def parse_rung(spec: str, *, field: str = "quantize.rungs") -> Rung:
    """``"Q4_K_M"`` or ``"Q4_K_M+imatrix"``; types that need an imatrix always get one."""
    text = spec.strip()
    want_imatrix = text.upper().endswith(IMATRIX_SUFFIX.upper())
    name = text[: -len(IMATRIX_SUFFIX)] if want_imatrix else text
    quant = QUANT_TYPES.get(name.upper())
    if quant is None:
        known = ", ".join(QUANT_TYPES)
        raise ConfigError(field, f"unknown GGUF quant type '{spec}'",
                          f"use one of {known} (optionally with '{IMATRIX_SUFFIX}', e.g. Q4_K_M{IMATRIX_SUFFIX})")
    if quant.name in REFERENCE_TYPES and want_imatrix:
        raise ConfigError(field, f"'{spec}': an unquantized type takes no importance matrix", f"write {quant.name}")
    return Rung(quant=quant, use_imatrix=want_imatrix or quant.needs_imatrix)


def parse_ladder(specs: list[str] | tuple[str, ...], *, field: str = "quantize.rungs") -> list[Rung]:
    if not specs:
        raise ConfigError(field, "the ladder is empty", f"list quant types, e.g. {list(DEFAULT_LADDER)}")
    rungs = [parse_rung(s, field=field) for s in specs]
    labels = [r.label for r in rungs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(field, f"rungs listed twice: {dupes}", "list each rung once")
    return rungs


def llama_ftype(llama_cpp, quant: QuantType) -> int:
    """The ``llama_ftype`` value for a type, from the installed binding (no copied numbers)."""
    name = "LLAMA_FTYPE_ALL_F32" if quant.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{quant.name}"
    value = getattr(llama_cpp, name, None)
    if value is None:
        raise ConfigError("quantize.rungs", f"{quant.name}: the installed llama-cpp-python has no {name}",
                          "drop this rung or rebuild llama-cpp-python (scripts/build_llama_cpp.sh)")
    return int(value)
