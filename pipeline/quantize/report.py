"""ladder.md (the table) and ladder.png (quality against size) from the ladder's rows."""

from __future__ import annotations

from pathlib import Path

from pipeline.fsutil import atomic_write_json, atomic_write_text
from pipeline.quantize.gguf_file import mark_identical_rungs


def ladder_markdown(result: dict) -> str:
    ref, scoring = result["reference"], result["scoring"]
    intro = (
        f"Reference: {ref['type']} GGUF under llama.cpp ({ref['why']}); every rung scored with llama.cpp on the same "
        f"{ref['score']['positions']} held-out next-token positions ({scoring['windows']} windows of "
        f"{scoring['window']} tokens). KLD = mean KL(reference || rung) in nats; top-1 = share of positions where "
        "the rung's most likely next token is the reference's. Size in MB of 10^6 bytes (the file); bpw = "
        "llama.cpp's tensor bytes x 8 / parameters. Tensor types = the share of parameters in each type, read "
        "back from the file (llama.cpp falls back from k-quants on tensors whose rows are not a multiple of 256). "
        "Wall s = quantize + score, on a shared machine (noisy)."
    )
    ref_row = (
        f"| {ref['type']} (reference) | {ref['file_mb']:.1f} | {ref['bpw']:.2f} | {ref['score']['perplexity']:.3f} "
        f"| 0 | 0 | 1 | {ref['type']} | {ref['convert_s'] + ref['score']['score_s']:.1f} |"
    )
    lines = [f"# GGUF ladder: {result['model_name']}", "", intro, "",
             "| rung | size MB | bpw | ppl | KLD | KLD p99 | top-1 | tensor types | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|", ref_row]
    mark_identical_rungs(result["rungs"])
    for r in result["rungs"]:
        s = r["score"]
        label = r["label"] + (f" (same file as {r['same_file_as']})" if r.get("same_file_as") else "")
        lines.append(f"| {label} | {r['file_mb']:.1f} | {r['bpw']:.2f} | {s['perplexity']:.3f} | {s['mean_kld']:.5f} "
                     f"| {s['kld_p99']:.4f} | {s['top1_agreement']:.4f} | {r.get('tensor_types_text', '–')} "
                     f"| {r['quantize_s'] + s['score_s']:.1f} |")
    hf = result.get("reference_vs_transformers")
    if hf:
        lines += ["", (f"Reference vs transformers (first window, {hf['positions']} positions): KLD "
                       f"{hf['mean_kld']:.2e}, top-1 {hf['top1_agreement']:.4f}, max |log-prob diff| "
                       f"{hf['max_abs_logprob_diff']:.2e}.")]
    conv = result.get("conversion_verified") or {}
    if conv.get("verified") is False:
        lines += ["", f"**Conversion not verified** against transformers ({conv.get('why')}): the reference GGUF's "
                      "fidelity to the model is unmeasured (every rung's KL is measured against the reference, not the model)."]
    elif conv.get("verified"):
        lines += ["", f"Conversion verified: within KL {conv['max_kld']:g} nats and top-1 {conv['min_top1']:g} of "
                      "transformers (the stage fails otherwise)."]
    tok = result["tokenizer_fidelity"]
    forced = f"; pre-tokenizer forced to {tok['forced_pre_tokenizer']!r}" if tok.get("forced_pre_tokenizer") else ""
    chat = (f"; prompts with special tokens (add_bos_token={tok['add_bos']}) and {tok['chat_prompts_checked']} "
            "chat-rendered prompts equal too" if tok.get("add_bos") is not None else "")
    if tok.get("chat_not_checked"):
        chat += f" (chat prompts not checked: {tok['chat_not_checked']})"
    lines += ["", (f"Tokenizer: llama.cpp ids equal transformers' on {tok['texts_checked']} texts "
                   f"({tok['tokens_checked']} tokens){forced}{chat}.")]
    if result.get("imatrix"):
        im = result["imatrix"]
        overlap = im.get("calibration_texts_also_scored")
        where = (f"{overlap} calibration texts are also scored (flatters the imatrix rungs)." if overlap
                 else "calibration text disjoint from the scored text.")
        lines += ["", (f"Importance matrix: llama-imatrix on {im['tokens']} calibration tokens ({im['chunks']} "
                       f"chunks of {im['n_ctx']}); {where}")]
    if not result.get("complete", False):
        lines += ["", "**Incomplete**: the ladder stopped before every rung was made."]
    return "\n".join(lines) + "\n"


def plot_ladder(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kld, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    # One line per kind (plain / with importance matrix), each in order of size, so the curve reads
    # as quality against size whatever order the rungs were listed in.
    for with_imatrix, style, label in ((False, "o-", "rungs"), (True, "s--", "with importance matrix")):
        rungs = sorted((r for r in result["rungs"] if bool(r["imatrix"]) == with_imatrix), key=lambda r: r["file_mb"])
        if not rungs:
            continue
        sizes = [r["file_mb"] for r in rungs]
        klds = [max(r["score"]["mean_kld"], 1e-7) for r in rungs]
        ppls = [r["score"]["perplexity"] for r in rungs]
        ax_kld.plot(sizes, klds, style, label=label)
        ax_ppl.plot(sizes, ppls, style, label=label)
        for r, x, k, p in zip(rungs, sizes, klds, ppls):
            ax_kld.annotate(r["label"], (x, k), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax_ppl.annotate(r["label"], (x, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_kld.set_yscale("log")
    ax_kld.set_xlabel("file size (MB)")
    ax_kld.set_ylabel("mean KL(reference || rung), nats")
    ax_kld.legend()
    ref = result["reference"]
    ax_ppl.axhline(ref["score"]["perplexity"], color="gray", linestyle=":", label=f"{ref['type']} reference")
    ax_ppl.set_xlabel("file size (MB)")
    ax_ppl.set_ylabel(f"perplexity under llama.cpp ({result['scoring']['window']}-token windows)")
    ax_ppl.legend()
    fig.suptitle(f"GGUF ladder of {result['model_name']}: quality vs size (llama.cpp, same held-out tokens)")
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_ladder_reports(result: dict, out_dir: Path, *, plot: bool) -> None:
    mark_identical_rungs(result["rungs"])
    atomic_write_json(out_dir / "ladder.json", result)
    atomic_write_text(out_dir / "ladder.md", ladder_markdown(result))
    if plot and result["rungs"]:
        plot_ladder(result, out_dir / "ladder.png")
