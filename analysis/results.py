"""Results as frozen dataclasses of numpy arrays, and their JSON form (schema headscope.results/1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis.errors import HeadscopeError

SCHEMA = "headscope.results/1"
MODEL_KEYS = ("id", "revision", "architecture", "family", "n_layers", "n_heads", "n_kv_heads", "d_head", "causal",
              "dtype", "device")
ARRAY_FIELDS = ("q_means", "q_stds", "k_means", "k_stds", "same_head_dp", "diff_head_dp", "final_to_prev",
                "self_attention", "first_self", "sink_mass")


@dataclass(frozen=True, eq=False)
class LayerResult:
    q_means: np.ndarray  # [head]
    q_stds: np.ndarray  # [head]
    k_means: np.ndarray  # [kv_head]
    k_stds: np.ndarray  # [kv_head]
    same_head_dp: np.ndarray  # [head * (pos-2)]
    diff_head_dp: np.ndarray  # [head * (kv_head-1) * (pos-2)]
    final_to_prev: np.ndarray  # [head * (pos-1)]
    self_attention: np.ndarray  # [head * (pos-1)]
    first_self: np.ndarray  # [head]
    sink_mass: np.ndarray  # [head]
    parity_max_abs_err: float
    kde: dict[str, np.ndarray] | None  # grid, final_to_prev, self_attention: [300] each
    patterns: np.ndarray | None = None  # [head, q_pos, k_pos]

    def to_dict(self, include_patterns: bool = False) -> dict:
        out = {name: getattr(self, name).tolist() for name in ARRAY_FIELDS}
        out["parity_max_abs_err"] = float(self.parity_max_abs_err)
        out["kde"] = None if self.kde is None else {name: values.tolist() for name, values in self.kde.items()}
        if include_patterns and self.patterns is not None:
            out["patterns"] = self.patterns.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerResult:
        kde = data.get("kde")
        patterns = data.get("patterns")
        return cls(
            **{name: np.asarray(data[name], dtype=np.float64) for name in ARRAY_FIELDS},
            parity_max_abs_err=float(data["parity_max_abs_err"]),
            kde=None if kde is None else {name: np.asarray(values) for name, values in kde.items()},
            patterns=None if patterns is None else np.asarray(patterns, dtype=np.float32),
        )


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    model: dict  # MODEL_KEYS
    text: str
    tokens: tuple[str, ...]
    token_ids: np.ndarray  # [pos]
    special_positions: tuple[int, ...]  # positions of BOS/CLS/SEP and other special tokens
    exclude_first_token: bool
    layers: dict[int, LayerResult]
    warnings: tuple[str, ...] = field(default=())

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def first_token(self) -> str:
        """The token at position 0, the one "exclude first token" leaves out (often BOS or CLS)."""
        return self.tokens[0]

    @property
    def first_token_is_special(self) -> bool:
        return 0 in self.special_positions

    def to_dict(self, include_patterns: bool = False) -> dict:
        return {
            "schema": SCHEMA,
            "model": {key: self.model[key] for key in MODEL_KEYS},
            "text": self.text,
            "tokens": list(self.tokens),
            "token_ids": [int(i) for i in self.token_ids],
            "special_positions": list(self.special_positions),
            "settings": {"exclude_first_token": self.exclude_first_token},
            "warnings": list(self.warnings),
            "layers": {str(layer): result.to_dict(include_patterns) for layer, result in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> AnalysisResult:
        if data.get("schema") != SCHEMA:
            raise HeadscopeError(f"Not a {SCHEMA} document (schema: {data.get('schema')!r}).")
        return cls(
            model=dict(data["model"]),
            text=data["text"],
            tokens=tuple(data["tokens"]),
            token_ids=np.asarray(data["token_ids"], dtype=np.int64),
            special_positions=tuple(data.get("special_positions", ())),
            exclude_first_token=bool(data["settings"]["exclude_first_token"]),
            layers={int(key): LayerResult.from_dict(value) for key, value in data["layers"].items()},
            warnings=tuple(data.get("warnings", ())),
        )
