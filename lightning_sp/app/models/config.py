"""The shape of the Llama-style decoder, with a per-layer attention pattern (sliding-window layers
next to global ones, as Mistral, Gemma 2/3 and GPT-OSS configure them)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import SPConfigError

# Hugging Face's names for a layer's attention (``config.layer_types``)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig:
    """``sliding_window``: how many tokens a query of a sliding layer sees, itself included (Hugging
    Face's meaning). ``layer_types``: one of ``LAYER_TYPES`` per layer; None makes every layer
    sliding when ``sliding_window`` is set (Mistral), else global."""

    vocab_size: int = 264
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # hidden_size // num_heads when None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise SPConfigError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise SPConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                                f"(grouped-query attention shares each KV head among a whole group of query heads)")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise SPConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                                    f"set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise SPConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self._check_attention_pattern()

    def _check_attention_pattern(self) -> None:
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise SPConfigError(f"LlamaConfig.sliding_window must be a positive int (tokens a query sees, itself "
                                f"included) or None, got {self.sliding_window!r}")
        if self.layer_types is None:
            return
        types = tuple(self.layer_types)  # a Hydra ListConfig too
        bad = [t for t in types if t not in LAYER_TYPES]
        if len(types) != self.num_layers or bad:
            raise SPConfigError(f"LlamaConfig.layer_types needs one of {', '.join(LAYER_TYPES)} for each of the "
                                f"{self.num_layers} layers, got {list(types)}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise SPConfigError("LlamaConfig.layer_types has sliding_attention layers but sliding_window is None; "
                                "set sliding_window to the tokens a query of those layers sees")
        self.layer_types = types

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is None:
            return self.sliding_window is not None
        return self.layer_types[layer] == "sliding_attention"

    def window_size(self, layer: int) -> tuple[int, int]:
        """The ``window_size`` (flash-attn's ``(left, right)``, -1 unbounded) of a layer's causal attention."""
        return (self.sliding_window - 1, -1) if self.is_sliding(layer) else (-1, -1)

    def num_params(self) -> int:
        d, h, kv, hd, ff, V = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                               self.intermediate_size, self.vocab_size)
        layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * ff + 2 * d
        return V * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs per token (forward + backward): 6 N for the matmuls with the weights (the
        embedding lookup excluded) plus 12 x heads x head_dim per attended pair of each layer: a
        global layer attends seq_len keys a query (half when causal), a sliding layer at most its window."""
        n = self.num_params() - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
        keys = sum(attended_keys(seq_len, self.sliding_window if self.is_sliding(layer) else None, causal)
                   for layer in range(self.num_layers))
        return 6 * n + 12 * self.num_heads * self.head_dim * keys


def attended_keys(seq_len: int, window: int | None = None, causal: bool = True) -> float:
    """Keys a query attends to on average in one layer over ``seq_len`` tokens: all of them, half when
    causal, at most ``window`` (the tokens a query of a sliding layer sees) on a sliding causal layer."""
    if not causal:
        return float(seq_len)
    if window is not None and window < seq_len:
        return window - window * window / (2 * seq_len)  # (seq_len * w - w^2 / 2) pairs over seq_len queries
    return seq_len / 2


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
