"""Source models: where they are, what architecture they have, and where each tensor's bytes are.

Everything here is cheap (config files and safetensors headers only); no tensor data is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from pipeline.errors import ConfigError
from pipeline.merge.architectures import ARCHITECTURES, ArchitectureSpec
from pipeline.merge.safetensors_io import TORCH_NAME_TO_CODE, TensorInfo, read_header

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Files fetched from the hub before anything is checked: enough to validate the merge cheaply.
METADATA_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template*", "*.model", "merges.txt", "vocab.json", "*.tiktoken",
    SAFETENSORS_INDEX, PICKLE_INDEX,
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES:
        return True
    try:
        from huggingface_hub import is_offline_mode
        return bool(is_offline_mode())
    except ImportError:  # pragma: no cover - older huggingface_hub
        return False


def resolve_model_dir(ref: str, where: str, *, patterns: list[str]) -> Path:
    """A local directory, or a hub repo id (``org/name[@revision]``) resolved through the HF cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(where, f"{ref!r} is a file, not a model directory", "give the directory holding config.json")
    repo, _, revision = ref.partition("@")
    if "+" in ref:
        raise ConfigError(where, f"{ref!r}: LoRA references (model+lora) are not supported by this merge",
                          "merge the adapter into its base model first and reference the result")
    if not _REPO_ID.match(repo) or ref.startswith((".", "/", "~")):
        raise ConfigError(where, f"model directory {ref!r} does not exist", "fix the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns,
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:
            raise ConfigError(
                where, f"{ref!r} is not a local directory and hub repo {repo!r} is not in the local HF cache, "
                "and HF_HUB_OFFLINE=1 forbids downloading it",
                f"download it first (`hf download {repo}`) or unset HF_HUB_OFFLINE",
            ) from None
        raise ConfigError(where, f"could not download hub repo {repo!r} (no network?)",
                          f"download it first (`hf download {repo}`) or give a local directory") from None
    except (HfHubHTTPError, ValueError, OSError) as e:
        raise ConfigError(where, f"{ref!r} is neither a local directory nor a downloadable hub repo ({type(e).__name__}: {e})",
                          "fix the path / repo id, or log in for gated repos (`hf auth login`)") from None


@dataclass
class SourceModel:
    """One model referenced by the merge, with its config and the location of every tensor."""

    ref: str
    path: Path
    config: Dict[str, Any]
    arch: ArchitectureSpec
    num_layers: int
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    # Tensors of pickle checkpoints (only with allow_pickle), memory-mapped by torch.load.
    pickled: Dict[str, Any] = field(default_factory=dict)
    checkpoint_files: list = field(default_factory=list)
    from_hub: bool = False
    trust_remote_code: bool = False
    _hf_config: Any = field(default=None, repr=False)

    @property
    def hf_config(self) -> Any:
        """The config as transformers sees it (defaults and derived fields such as layer_types
        filled in). Loaded on first use only: importing transformers (and torch) costs seconds and
        ~200 MB, which a merge of complete config.json files never needs."""
        if self._hf_config is None:
            try:
                from transformers import AutoConfig

                self._hf_config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=self.trust_remote_code)
            except Exception as e:  # transformers raises many types for bad configs
                raise ConfigError(str(self.path / "config.json"),
                                  f"transformers cannot read this config ({type(e).__name__}: {e})",
                                  "fix config.json") from None
        return self._hf_config

    def config_value(self, key: str) -> Any:
        """The value in config.json, else the effective one (class default or derived)."""
        if key in self.config:
            return self.config[key]
        return getattr(self.hf_config, key, None)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config_value("tie_word_embeddings"))


def load_source_config(ref: str, where: str, *, trust_remote_code: bool = False) -> SourceModel:
    """Resolve ``ref`` and read its config.json; refuse architectures not in the table."""
    path = resolve_model_dir(ref, where, patterns=METADATA_PATTERNS)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(str(cfg_file), f"missing: {ref!r} has no config.json",
                          "point to a Hugging Face model directory (save_pretrained output)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(str(cfg_file), f"unreadable config ({e})", "re-download or fix the file") from None
    archs = config.get("architectures") or []
    arch = ARCHITECTURES.get(archs[0]) if len(archs) == 1 else None
    if arch is None or config.get("model_type") not in arch.model_types:
        raise ConfigError(
            str(cfg_file),
            f"unknown architecture {archs or None} (model_type {config.get('model_type')!r}); the merge only "
            f"handles architectures whose weight layout it knows: {', '.join(sorted(ARCHITECTURES))}",
            "add the architecture to pipeline/merge/architectures.py (weight names per layer) rather than guessing",
        )
    src = SourceModel(ref=ref, path=path, config=config, arch=arch, num_layers=0,
                      from_hub=not Path(ref).expanduser().is_dir(), trust_remote_code=trust_remote_code)
    num_layers = src.config_value(arch.num_layers_config_key)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
        raise ConfigError(str(cfg_file), f"{arch.num_layers_config_key} is {num_layers!r}, expected a positive integer")
    src.num_layers = num_layers
    return src


def load_checkpoint_index(src: SourceModel, where: str, *, allow_pickle: bool) -> None:
    """Fill ``src.tensors`` from the safetensors headers (or, with allow_pickle, from *.bin files)."""
    if src.from_hub:
        # The weights of a hub repo are only fetched once the cheap checks have passed.
        src.path = resolve_model_dir(
            src.ref, where, patterns=METADATA_PATTERNS + ["*.safetensors"] + (["*.bin"] if allow_pickle else []))
    path = src.path
    index_file = path / SAFETENSORS_INDEX
    if index_file.is_file():
        shard_of = _read_weight_map(index_file)
        files = sorted(set(shard_of.values()))
        for name in files:
            if not (path / name).is_file():
                raise ConfigError(str(index_file), f"names shard {name!r}, which is missing from {path}",
                                  "re-download the model (an interrupted download leaves shards out)")
        for name in files:
            header = read_header(path / name)
            src.tensors.update(header)
            src.checkpoint_files.append(path / name)
        for tensor, shard in shard_of.items():
            info = src.tensors.get(tensor)
            if info is None or info.file.name != shard:
                raise ConfigError(str(index_file), f"says tensor {tensor!r} is in {shard!r}, but that shard's header "
                                  "does not contain it", "re-download the model")
        return
    if (path / SAFETENSORS_SINGLE).is_file():
        src.tensors.update(read_header(path / SAFETENSORS_SINGLE))
        src.checkpoint_files.append(path / SAFETENSORS_SINGLE)
        return
    pickle_files = _pickle_files(path)
    if pickle_files:
        if not allow_pickle:
            raise ConfigError(
                str(pickle_files[0]), "only a PyTorch pickle checkpoint (*.bin) is present; loading pickles can "
                "run arbitrary code, so they are refused by default",
                "convert the model to safetensors, or set model.allow_pickle=true / pass --allow-pickle "
                "(loads with torch.load(weights_only=True))",
            )
        _load_pickled(src, pickle_files)
        return
    raise ConfigError(str(path), "no weights found (no model.safetensors[.index.json] or pytorch_model*.bin)",
                      "point to a complete model directory (hub pickle weights are only fetched with allow_pickle)")


def _read_weight_map(index_file: Path) -> Dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(str(index_file), f"unreadable shard index ({type(e).__name__}: {e})",
                          "re-download the model") from None


def _pickle_files(path: Path) -> list[Path]:
    if (path / PICKLE_INDEX).is_file():
        shard_of = _read_weight_map(path / PICKLE_INDEX)
        files = [path / n for n in sorted(set(shard_of.values()))]
        for f in files:
            if not f.is_file():
                raise ConfigError(str(path / PICKLE_INDEX), f"names shard {f.name!r}, which is missing",
                                  "re-download the model")
        return files
    return [path / PICKLE_SINGLE] if (path / PICKLE_SINGLE).is_file() else []


def _load_pickled(src: SourceModel, files: list[Path]) -> None:
    import torch

    for f in files:
        try:
            try:  # mmap keeps memory flat for zip-format checkpoints (torch >= 1.6)
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(str(f), f"cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {e})",
                              "convert the checkpoint to safetensors") from None
        if not isinstance(state, dict):
            raise ConfigError(str(f), "does not hold a state dict", "convert the checkpoint to safetensors")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            code = TORCH_NAME_TO_CODE.get(str(t.dtype).removeprefix("torch."))
            if code is None:
                raise ConfigError(str(f), f"tensor {name!r} has unsupported dtype {t.dtype}")
            nbytes = t.numel() * t.element_size()
            src.tensors[name] = TensorInfo(name, code, tuple(t.shape), f, 0, nbytes)
            src.pickled[name] = t
        src.checkpoint_files.append(f)
