"""Config <-> YAML without Hydra: load a resolved config file into the typed schema, save one with
secrets scrubbed."""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_write_text

# Key names whose values are never written anywhere (configs, manifests, logs).
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|key)$", re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")
REDACTED = "***"


def to_typed(cfg) -> PipelineConfig:
    """DictConfig (Hydra) -> PipelineConfig dataclass, with a readable error on bad values."""
    try:
        schema = OmegaConf.structured(PipelineConfig)
        # Re-validate from plain values: Hydra's `+key=value` override can add a key to a typed node.
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        merged = OmegaConf.merge(schema, plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key {getattr(e, 'full_key', '?')}", str(e).splitlines()[0],
                          "check the spelling and type of the key (see conf/ and pipeline/config.py)") from None


def load_config_file(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file does not exist")
    return to_typed(OmegaConf.load(path))


def scrub_secrets(obj):
    """A copy of a nested dict/list with secret-looking keys and known secret values redacted."""
    secret_values = {v for k in SECRET_ENV if (v := os.environ.get(k))}
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and obj[k] not in (None, "") else scrub_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, str) and obj in secret_values:
        return REDACTED
    return obj


def config_to_dict(cfg: PipelineConfig) -> dict:
    return scrub_secrets(asdict(cfg))


def save_config(cfg: PipelineConfig, path: str | Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))
