"""The GGUF side of a release: the quantized-versions section of the model card and the card
(README.md) of the ``<repo_id>-GGUF`` repository, both from the quantize stage's ladder.
"""

from __future__ import annotations

from typing import Optional

from pipeline.release.card_format import format_count
from pipeline.release.record import BASE_TAGS, RunRecord


def gguf_repo_id(repo_id: Optional[str]) -> Optional[str]:
    return f"{repo_id}-GGUF" if repo_id else None


def ladder_perplexity_label(ladder: dict) -> str:
    """The ladder's perplexity is llama.cpp's, on its own windows of half the held-out records (the
    other half calibrates the imatrix): not the eval table's number, so not its label."""
    scoring = ladder.get("scoring") or {}
    return (f"ppl under llama.cpp ({scoring.get('window', '?')}-token windows, "
            f"{format_count(scoring.get('positions'))} scored positions)")


def ladder_table(ladder: dict) -> list[str]:
    ref = ladder["reference"]
    rows = [f"| file | quant | size (MB) | bits per weight | {ladder_perplexity_label(ladder)} | KL divergence | top-1 agreement "
            "| tensor types (share of parameters) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            f"| (not published) | {ref['type']} reference | {ref['file_mb']:.1f} | {ref['bpw']:.2f} | "
            f"{ref['score']['perplexity']:.3f} | 0 | 1 | {ref['type']} |"]
    for r in sorted(ladder["rungs"], key=lambda r: r["file_mb"]):
        s = r["score"]
        quant = r["label"] + (f" (**same file as {r['same_file_as']}**)" if r.get("same_file_as") else "")
        rows.append(f"| `{r['file']}` | {quant} | {r['file_mb']:.1f} | {r['bpw']:.2f} | {s['perplexity']:.3f} | "
                    f"{s['mean_kld']:.4f} | {s['top1_agreement']:.3f} | {r.get('tensor_types_text', '–')} |")
    return rows


def ollama_tag(rung: dict) -> str:
    """The tag Ollama picks a file of a GGUF repository by: the rung's quant type (an imatrix rung's
    file name ends in ``-imat``, which names no type)."""
    return rung["type"]


def _run_gguf_lines(rung: dict, repo: str) -> list[str]:
    file = rung["file"]
    return ["```bash",
            f"llama-cli -m {file} -cnv                        # llama.cpp",
            f"ollama run hf.co/{repo}:{ollama_tag(rung)}   # Ollama, straight from the Hub",
            "```",
            "LM Studio: search for the repository name and pick a file by its quant type."]


def quantized_section(run: RunRecord, repo_id: Optional[str]) -> list[str]:
    if not run.ladder:
        return []
    repo = gguf_repo_id(repo_id) or "<this repo>-GGUF"
    best = min((r for r in run.ladder["rungs"]), key=lambda r: abs(r["score"]["mean_kld"] - 0.01), default=None)
    lines = ["## Quantized versions (GGUF)", "",
             f"Made from this model with llama.cpp (`{repo}`), each file scored under llama.cpp against the "
             f"unquantized {run.ladder['reference']['type']} GGUF on the same held-out tokens "
             f"({run.ladder['reference']['score']['positions']} next-token positions): perplexity, mean KL "
             "divergence and how often the most likely next token is the reference's.", "", *ladder_table(run.ladder)]
    if (run.quantize_dir / "ladder.png").is_file():
        lines += ["", "![Quality against size of every quantized file](ladder.png)"]
    if best is not None:
        lines += ["", "To run one:", "", *_run_gguf_lines(best, repo)]
    return lines


def render_gguf_card(run: RunRecord, *, repo_id: Optional[str] = None) -> str:
    """README.md of the GGUF repository: the ladder, how it was measured, how to run each file."""
    from huggingface_hub import ModelCardData

    repo_id = repo_id or run.release_cfg.get("repo_id")
    name = repo_id.split("/")[-1] if repo_id else (run.run_name or run.run_dir.name)
    meta = {"base_model": repo_id or name, "tags": ["gguf", "quantized", *BASE_TAGS], "library_name": "gguf",
            "pipeline_tag": "text-generation"}
    license = run.release_cfg.get("license")
    if license:
        meta["license"] = license
    body = [f"# {name} GGUF", "",
            f"GGUF files of [{name}]({'https://huggingface.co/' + repo_id if repo_id else '../'}) "
            "(a depth up-scaled model, see its card), made and measured by dus-pipeline with llama.cpp.", "",
            *quantized_section(run, repo_id)[2:]]
    front = ModelCardData(**meta).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip("\n") + "\n"
