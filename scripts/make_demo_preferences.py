"""Build preference pairs for DPO from instruction data (data/demo/preferences.jsonl, or your own).

Each pair is a question from the instruction file, its reference answer as ``chosen``, and as
``rejected`` either

* (default) the answer of another row, picked with a fixed seed: a mismatched reply. Needs no
  model and is exactly reproducible, but easy to tell apart (it is off-topic); it teaches
  "answer the question that was asked" and makes a visible held-out accuracy on a tiny model.
* (``--model DIR``) a reply sampled from your own sft model (the SPIN recipe, Chen et al. 2024:
  human reference preferred over the model's own generation). Harder, on-policy negatives; the
  result depends on the model and the sampling seed. Samples that come out empty or equal to the
  reference are skipped and counted.

Rows are chosen per split so that both sides are represented: ``--heldout-pairs`` from the rows
that ``pipeline.data.is_heldout`` holds out at ``--heldout-fraction`` (keyed like sft, on the
conversation), the rest from the train rows. A pair is held out by the dpo stage exactly when its
conversation was held out by sft (``pipeline.data.preference.preference_key``), so held-out pairs
score models on questions neither sft nor dpo trained on.

    # the shipped demo file (byte-identical on re-run)
    python scripts/make_demo_preferences.py
    # from your own sft model (e.g. <run_dir>/03_sft), rejected replies sampled from it
    python scripts/make_demo_preferences.py --model outputs/demo/03_sft --out my_preferences.jsonl \\
        --train-pairs 2000 --heldout-pairs 200
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeline.data import conversation_key, is_heldout, load_conversations  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.fsutil import atomic_write_text, sha256_file  # noqa: E402

DEFAULT_INPUT = REPO_ROOT / "data" / "demo" / "instructions.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "data" / "demo" / "preferences.jsonl"


def select_rows(conversations: list[list[dict]], *, heldout_fraction: float, train_pairs: int, heldout_pairs: int,
                seed: int) -> list[int]:
    """Indices of one-turn user/assistant conversations: ``heldout_pairs`` held out, ``train_pairs``
    not, sampled with ``seed`` and returned in file order."""
    usable = [i for i, c in enumerate(conversations)
              if [m["role"] for m in c] == ["user", "assistant"] and c[0]["content"].strip() and c[1]["content"].strip()]
    held = [i for i in usable if is_heldout(conversation_key(conversations[i]), heldout_fraction)]
    train = [i for i in usable if not is_heldout(conversation_key(conversations[i]), heldout_fraction)]
    if heldout_pairs > len(held) or train_pairs > len(train):
        raise ConfigError("make_demo_preferences", f"asked for {heldout_pairs} held-out / {train_pairs} train pairs but the "
                          f"file has {len(held)} held-out / {len(train)} train one-turn conversations",
                          "ask for fewer pairs or change --heldout-fraction")
    rng = random.Random(seed)
    return sorted(rng.sample(held, heldout_pairs) + rng.sample(train, train_pairs))


def mismatched_pairs(conversations: list[list[dict]], rows: list[int], *, seed: int) -> list[dict]:
    """Reference answer as chosen, another row's answer (fixed seed) as rejected."""
    rng = random.Random(seed + 1)
    answers = [c[-1]["content"] for c in conversations]
    pairs = []
    for i in rows:
        while True:
            j = rng.randrange(len(conversations))
            if j != i and answers[j].strip() != answers[i].strip():
                break
        pairs.append({"prompt": conversations[i][:1], "chosen": conversations[i][1:],
                      "rejected": [{"role": "assistant", "content": answers[j]}],
                      "source": {"row": i, "rejected": f"answer of row {j}"}})
    return pairs


def sampled_pairs(conversations: list[list[dict]], rows: list[int], *, model_dir: str, seed: int,
                  max_new_tokens: int, temperature: float, batch_size: int) -> tuple[list[dict], int]:
    """Reference answer as chosen, a sample of the model as rejected; (pairs, samples skipped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ConfigError("--model", f"the tokenizer of {model_dir} has no chat template", "give an sft model's directory")
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, use_safetensors=True).eval()
    pairs, skipped = [], 0
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        prompts = [tokenizer.apply_chat_template(conversations[i][:1], tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"] for i in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=temperature,
                                 top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        for i, seq in zip(chunk, out[:, width:].tolist()):
            reply = tokenizer.decode(seq, skip_special_tokens=True).strip()
            if not reply or reply == conversations[i][1]["content"].strip():
                skipped += 1
                continue
            pairs.append({"prompt": conversations[i][:1], "chosen": conversations[i][1:],
                          "rejected": [{"role": "assistant", "content": reply}],
                          "source": {"row": i, "rejected": f"sample of the model (seed {seed}, temperature {temperature})"}})
    return pairs, skipped


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(DEFAULT_INPUT), help="instruction conversations (any sft format)")
    ap.add_argument("--out", default=str(DEFAULT_OUTPUT))
    ap.add_argument("--heldout-fraction", type=float, default=0.05, help="data.heldout_fraction of the runs using it")
    ap.add_argument("--train-pairs", type=int, default=288)
    ap.add_argument("--heldout-pairs", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--model", default=None, help="sft model dir: sample rejected replies from it")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    conversations = load_conversations([args.input])
    rows = select_rows(conversations, heldout_fraction=args.heldout_fraction, train_pairs=args.train_pairs,
                       heldout_pairs=args.heldout_pairs, seed=args.seed)
    skipped = 0
    if args.model:
        pairs, skipped = sampled_pairs(conversations, rows, model_dir=args.model, seed=args.seed,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       batch_size=args.batch_size)
    else:
        pairs = mismatched_pairs(conversations, rows, seed=args.seed)
    atomic_write_text(args.out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    heldout = sum(is_heldout(conversation_key(p["prompt"] + p["chosen"]), args.heldout_fraction) for p in pairs)
    stats = {"out": args.out, "pairs": len(pairs), "heldout_pairs": heldout, "train_pairs": len(pairs) - heldout,
             "skipped_samples": skipped, "sha256": sha256_file(args.out), "bytes": Path(args.out).stat().st_size}
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
