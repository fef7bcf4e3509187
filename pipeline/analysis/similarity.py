"""Layer-similarity statistics of a causal LM from one streamed forward pass.

Notation: ``h_l`` is the hidden state (residual stream) entering decoder layer ``l``; ``h_0`` is the
embedding output and ``h_N`` the raw output of the last layer (before the final norm), so a model
with ``N`` layers has ``N + 1`` of them.

* Block Influence of layer ``l`` (ShortGPT, arXiv 2403.03853): ``1 - cos(h_l, h_{l+1})``, averaged
  over tokens. A layer that leaves the residual stream unchanged has BI 0.
* Angular distance between layers ``l`` and ``l + n`` (Gromov et al., arXiv 2403.17887):
  ``arccos(cos(h_l, h_{l+n})) / pi``, averaged over tokens (Gromov et al. use the last token of
  each sequence; every token is used here, which gives far more samples per forward pass).

Only ``(N+1) x (N+1)`` running sums are kept between batches, never the hidden states themselves,
so memory is one batch's activations whatever the number of tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from pipeline.errors import ConfigError
from pipeline.evaluation.metrics import scored_nll
from pipeline.log import progress as progress_display


@dataclass
class LayerSimilarity:
    """What one analysis pass measured (plain lists, JSON-serialisable with ``asdict``)."""

    num_layers: int
    num_tokens: int
    # block_influence[l] = mean over tokens of 1 - cos(h_l, h_{l+1}), l in [0, N).
    block_influence: List[float]
    # angular_distance[i][j] = mean over tokens of arccos(cos(h_i, h_j)) / pi, i, j in [0, N]
    # (symmetric, zero diagonal).
    angular_distance: List[List[float]]
    # Perplexity of the unmodified model on the same tokens (free: the logits are computed anyway).
    perplexity: float
    seconds: float = 0.0
    model_dir: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def distance(self, layer: int, n: int) -> float:
        """Gromov's d(h_layer, h_{layer+n}): the angular distance across ``n`` layers from ``layer``."""
        if not (0 <= layer and n >= 0 and layer + n <= self.num_layers):
            raise IndexError(f"layer {layer} + n {n} outside [0, {self.num_layers}]")
        return self.angular_distance[layer][layer + n]

    def distance_table(self) -> List[List[Optional[float]]]:
        """Rows = starting layer l, columns = n - 1 for n in [1, N]; None where l + n > N."""
        n_layers = self.num_layers
        return [[self.angular_distance[l][l + n] if l + n <= n_layers else None for n in range(1, n_layers + 1)]
                for l in range(n_layers)]

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_layers(model) -> Sequence:
    """The model's decoder layer list (``model.model.layers`` in every architecture the merge supports)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError(type(model).__name__, "has no model.layers list of decoder layers",
                          "analyze a decoder-only model of an architecture listed in pipeline/merge/architectures.py")
    return layers


def pick_device_and_dtype(device: Optional[str] = None, dtype: Optional[str] = None):
    """CUDA with bf16 when a GPU is present, else CPU with fp32 (bf16 matmuls lose too much for
    cosines close to 1 on CPU, and are not faster for small models there)."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError("--dtype", f"unsupported dtype {dtype!r}", "use bfloat16, float16 or float32")
    return dev, getattr(torch, dtype)


def load_model_for_analysis(model_dir: Path | str, *, device=None, dtype=None):
    """A local safetensors checkpoint for inference (no remote code, no pickles: ``load_causal_lm``'s
    defaults) on the analysis device and dtype (``pick_device_and_dtype``)."""
    from pipeline.training.model import load_causal_lm

    dev, torch_dtype = pick_device_and_dtype(device, dtype)
    model = load_causal_lm(model_dir, dtype=torch_dtype)
    model.to(dev).eval()
    return model


class _Accumulator:
    """Running sums over tokens of cos(h_i, h_j) and arccos(cos(h_i, h_j)) for all layer pairs."""

    def __init__(self, num_states: int):
        import torch

        self.cos_sum = torch.zeros(num_states, num_states, dtype=torch.float64)
        self.angle_sum = torch.zeros(num_states, num_states, dtype=torch.float64)
        self.tokens = 0

    def add(self, states, *, tokens_per_chunk: int = 256) -> None:
        """``states``: [S, T, d] hidden states of T tokens at S depths (any dtype/device)."""
        import torch

        for start in range(0, states.shape[1], tokens_per_chunk):
            # float64: for a layer that barely changes the stream, cos is 1 - 1e-7 and float32
            # rounding alone would give an angle of ~1e-4; float64 keeps identical inputs at ~1e-8.
            # Chunks of tokens bound the float64 copy (S x 256 x d: 0.3 GB for a 32-layer 4096-wide model).
            x = states[:, start:start + tokens_per_chunk].to(torch.float64)
            unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            # [S, S, t] cosines, one pair of depths per entry.
            cos = torch.einsum("itd,jtd->ijt", unit, unit).clamp_(-1.0, 1.0)
            self.cos_sum += cos.sum(-1).cpu()
            self.angle_sum += (torch.arccos(cos) / math.pi).sum(-1).cpu()
        self.tokens += states.shape[1]


def analyze_layers(
    model_dir: Path | str | None = None,
    token_batches: Iterable = (),
    *,
    model=None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    progress: bool = True,
    total_batches: Optional[int] = None,
) -> LayerSimilarity:
    """One forward pass over ``token_batches`` (each a [B, T] LongTensor of packed, unpadded token
    blocks) collecting Block Influence, all-pairs angular distances and the perplexity.

    Pass ``model_dir`` (loaded here) or an already loaded ``model``.
    """
    import torch

    if model is None:
        if model_dir is None:
            raise ValueError("analyze_layers needs model_dir or model")
        model = load_model_for_analysis(model_dir, device=device, dtype=dtype)
    layers = decoder_layers(model)
    n_layers = len(layers)
    dev = next(model.parameters()).device

    # transformers 5 replaces the last entry of ``hidden_states`` by the *normed* final state; the
    # raw output of the last layer (what a layer placed after it would receive) is taken by a hook.
    last_output: list = []

    def keep_last_output(_module, _args, output):
        last_output.append(output[0] if isinstance(output, tuple) else output)

    hook = layers[n_layers - 1].register_forward_hook(keep_last_output)
    acc = _Accumulator(n_layers + 1)
    nll_sum, nll_count = 0.0, 0
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in progress_display(token_batches, total=total_batches, desc="layer similarity", unit="batch",
                              disable=not progress):
                ids = batch.to(dev)
                last_output.clear()
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
                hidden = out.hidden_states
                if len(hidden) != n_layers + 1 or len(last_output) != 1:
                    raise RuntimeError(f"expected {n_layers + 1} hidden states and one last-layer output, got "
                                       f"{len(hidden)} and {len(last_output)}")
                states = torch.stack([h.reshape(-1, h.shape[-1]) for h in hidden[:n_layers]]
                                     + [last_output[0].reshape(-1, hidden[0].shape[-1])])
                acc.add(states)
                nll, count = _next_token_nll(out.logits, ids, model)
                nll_sum += nll
                nll_count += count
    finally:
        hook.remove()
    if acc.tokens == 0:
        raise ConfigError("token_batches", "no tokens were given", "pass at least one batch of token ids")
    cos_mean = (acc.cos_sum / acc.tokens).tolist()
    angle = (acc.angle_sum / acc.tokens)
    angle.fill_diagonal_(0.0)
    return LayerSimilarity(
        num_layers=n_layers,
        num_tokens=acc.tokens,
        block_influence=[1.0 - cos_mean[l][l + 1] for l in range(n_layers)],
        angular_distance=angle.tolist(),
        perplexity=math.exp(nll_sum / max(nll_count, 1)),
        seconds=time.perf_counter() - started,
        model_dir=str(model_dir) if model_dir is not None else None,
    )


def _next_token_nll(logits, ids, model):
    """Sum and count of next-token negative log-likelihoods of one batch, scored as the eval stage
    scores its held-out perplexity (``pipeline.evaluation.metrics.scored_nll``: a BOS target is not
    scored), so the two perplexities differ only in the tokens and windows they are given."""
    return scored_nll(logits, ids, bos_token_id=getattr(model.config, "bos_token_id", None))


def measure_perplexity(model_dir: Path | str | None = None, token_batches: Iterable = (), *, model=None,
                       device: Optional[str] = None, dtype: Optional[str] = None, progress: bool = True,
                       total_batches: Optional[int] = None, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over the batches: a plain forward pass, the cost baseline of the analysis."""
    import torch

    if model is None:
        model = load_model_for_analysis(model_dir, device=device, dtype=dtype)
    dev = next(model.parameters()).device
    nll_sum, nll_count = 0.0, 0
    with torch.no_grad():
        for batch in progress_display(token_batches, total=total_batches, desc=desc, unit="batch", disable=not progress):
            ids = batch.to(dev)
            nll, count = _next_token_nll(model(input_ids=ids, use_cache=False).logits, ids, model)
            nll_sum += nll
            nll_count += count
    return math.exp(nll_sum / max(nll_count, 1))
