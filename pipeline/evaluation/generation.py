"""Greedy answers of each stage's model to a few fixed prompts: what people look at first, next to
the numbers. Deterministic (greedy, no sampling); every stage's prompt is rendered with the same chat
template (the final stage's), so the answers differ only by the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from pipeline.fsutil import atomic_write_json, atomic_write_text

GENERATIONS_JSON, GENERATIONS_MD = "generations.json", "generations.md"


@torch.no_grad()
def greedy_answers(model_dir: str, prompts: Sequence[str], *, chat_tokenizer_dir: str | None = None,
                   max_new_tokens: int = 64, trust_remote_code: bool = False) -> list[str]:
    """The model's greedy reply to each prompt (one user turn, the chat template's generation prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir or model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    answers = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def write_generations(prompts: Sequence[str], answers: Mapping[str, Sequence[str]], out_dir: Path) -> None:
    """``generations.json`` ({prompts, answers: {stage: [...]}}) and ``generations.md`` (per prompt, one line per stage)."""
    atomic_write_json(Path(out_dir) / GENERATIONS_JSON, {"prompts": list(prompts), "answers": {s: list(a) for s, a in answers.items()}})
    lines = ["# Greedy answers to fixed prompts", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", "", "| stage | answer |", "|---|---|"]
        lines += [f"| {stage} | {_cell(a[i])} |" for stage, a in answers.items()]
        lines.append("")
    atomic_write_text(Path(out_dir) / GENERATIONS_MD, "\n".join(lines))


def read_generations(eval_dir: Path) -> dict | None:
    path = Path(eval_dir) / GENERATIONS_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def read_generations_markdown(eval_dir: Path) -> str:
    return (Path(eval_dir) / GENERATIONS_MD).read_text()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"
