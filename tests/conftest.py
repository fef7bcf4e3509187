"""Shared pytest fixtures: a tiny tokenizer and a tiny Mistral base model, each built once per session.

* ``tiny_heldout_fraction``: the held-out share both are built with (split their corpus with it).
* ``tiny_demo_config``: the ``DemoModelConfig`` both are built from (a corpus slice, 4 layers).
* ``tiny_tokenizer_dir``: byte-level BPE (vocab 512) with the demo's special tokens and chat template.
* ``tiny_base_model_dir``: ``MistralForCausalLM`` (hidden 64, 4 layers, 4 heads, 2 kv heads,
  intermediate 128) pretrained for 100 quick steps (held-out perplexity ~135, clearly below a
  unigram model's ~200), saved like any HF checkpoint (safetensors +
  tokenizer + generation_config); it uses the tokenizer of ``tiny_tokenizer_dir``.

Treat both directories as read-only (copy them first to modify). Tests marked ``gpu`` are skipped
when no CUDA device is present.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import contextlib  # noqa: E402

import pytest  # noqa: E402

from pipeline.config import REPO_ROOT, DemoModelConfig  # noqa: E402

DEMO_DATA_DIR = REPO_ROOT / "data" / "demo"
DEMO_CORPUS = DEMO_DATA_DIR / "corpus.txt"
DEMO_INSTRUCTIONS = DEMO_DATA_DIR / "instructions.jsonl"
# The held-out share the tiny fixtures are built with (pass the same value when splitting their corpus).
TINY_HELDOUT_FRACTION = 0.05
# Every TINY_CORPUS_STRIDE-th record of the demo corpus goes into the tiny corpus (Shakespeare + speeches).
TINY_CORPUS_STRIDE = 8
TINY_INSTRUCTIONS = 400


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on ``n`` intra-op threads inside the block.

    Tiny models are overhead-bound: one thread is as fast as two on an idle machine, and many
    times faster when other processes compete for the cores (OpenMP threads then spin at barriers).
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_heldout_fraction() -> float:
    return TINY_HELDOUT_FRACTION


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """``corpus.txt`` (~400 KB slice of the demo corpus) and ``instructions.jsonl`` (400 conversations)."""
    from pipeline.data import load_text_records

    d = tmp_path_factory.mktemp("tiny_data")
    records = load_text_records([str(DEMO_CORPUS)])
    (d / "corpus.txt").write_text("\n\n\n".join(records[::TINY_CORPUS_STRIDE]) + "\n", encoding="utf-8")
    with open(DEMO_INSTRUCTIONS, encoding="utf-8") as src, open(d / "instructions.jsonl", "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= TINY_INSTRUCTIONS:
                break
            dst.write(line)
    return d


@pytest.fixture(scope="session")
def tiny_demo_config(tiny_data_dir) -> DemoModelConfig:
    return DemoModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        seq_len=64,
        batch_size=8,
        train_steps=100,
        learning_rate=1.0e-2,
        seed=0,
        corpus=str(tiny_data_dir / "corpus.txt"),
        tokenizer_files=[str(tiny_data_dir / "instructions.jsonl")],
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_demo_config) -> Path:
    from pipeline.models.demo import tokenizer_training_texts, train_demo_tokenizer

    d = tmp_path_factory.mktemp("tiny_tokenizer")
    texts = tokenizer_training_texts(tiny_demo_config, TINY_HELDOUT_FRACTION)
    train_demo_tokenizer(texts, tiny_demo_config.vocab_size, d,
                         model_max_length=tiny_demo_config.max_position_embeddings)
    return d


@pytest.fixture(scope="session")
def tiny_base_model_build(tmp_path_factory, tiny_demo_config, tiny_tokenizer_dir) -> tuple[Path, dict]:
    """(model dir, metrics returned by ``build_demo_base``)."""
    from pipeline.models.demo import build_demo_base

    d = tmp_path_factory.mktemp("tiny_base") / "model"
    with torch_threads(1):
        metrics = build_demo_base(tiny_demo_config, d, heldout_fraction=TINY_HELDOUT_FRACTION, progress=False,
                                  tokenizer_dir=tiny_tokenizer_dir)
    return d, metrics


@pytest.fixture(scope="session")
def tiny_base_model_dir(tiny_base_model_build) -> Path:
    return tiny_base_model_build[0]


@pytest.fixture(autouse=True)
def _private_machine_cache(tmp_path_factory, monkeypatch):
    """Tests never read or fill the user's ~/.cache/dus-pipeline demo bases (pipeline.models.demo)."""
    monkeypatch.setenv("DUS_MACHINE_CACHE", str(tmp_path_factory.mktemp("machine_cache")))
