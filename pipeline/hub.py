"""Is the Hugging Face Hub reachable? One answer for every stage (datasets, lm-eval tasks, base
model cards, uploads), read from the environment at call time so tests and callers can change it."""

from __future__ import annotations

import os

_TRUE = {"1", "ON", "YES", "TRUE"}


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def datasets_offline() -> bool:
    """Hub datasets cannot be fetched: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set."""
    return env_true("HF_HUB_OFFLINE") or env_true("HF_DATASETS_OFFLINE")


def hub_offline() -> bool:
    """Nothing can be downloaded from or uploaded to the Hub (HF_HUB_OFFLINE, as huggingface_hub reads it too)."""
    if env_true("HF_HUB_OFFLINE"):
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # pragma: no cover
        return False
