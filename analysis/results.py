"""Results as frozen dataclasses of numpy arrays, and their JSON form (schema headscope.results/1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis.errors import HeadscopeError
from analysis.keys import compared_keys, query_keys

SCHEMA = "headscope.results/1"
MODEL_KEYS = ("id", "revision", "architecture", "family", "n_layers", "n_heads", "n_kv_heads", "d_head", "causal",
              "dtype", "device", "device_map", "local_path", "attention_windows")  # device_map: "auto" or None
# (null); local_path: a local checkpoint's absolute directory, None for a hub or bundled model; attention_windows:
# [layer] the most keys a query sees under its layer's sliding window (null: no window), None when no layer has one
# (loading.attention_windows); older documents lack all three (no window)
ARRAY_FIELDS = ("q_means", "q_stds", "k_means", "k_stds", "same_head_dp", "diff_head_dp", "final_to_prev",
                "self_attention", "first_self", "sink_mass")
HEAD_SCORE_NAMES = ("previous_token", "duplicate_token", "induction", "sink", "self", "entropy")
DP_FLOATS = ("mannwhitney_p", "rank_biserial", "mannwhitney_p_centered", "rank_biserial_centered")
DP_ARRAYS = ("same_head_dp_centered", "diff_head_dp_centered")
# Which copies of the query's token the duplicate-token and induction scores count (analysis.head_scores): every
# other copy the query sees (today's), or the earlier copies only, what an encoder's results held before 2026-12-07
# (a head on every copy of its token then scored about 0.5). A causal model's query sees only the earlier copies,
# so its numbers are the same under both: a document without the setting is today's definition on a causal model.
SCORE_DEFINITION = "seen_copies"
OLD_SCORE_DEFINITION = "earlier_copies"
SCORE_DEFINITIONS = {SCORE_DEFINITION: "every other copy of the query's token that it sees",
                     OLD_SCORE_DEFINITION: "the earlier copies of the query's token only (an encoder's results "
                                           "written before 2026-12-07)"}
OLD_SCORES_NOTE = ("These duplicate-token and induction scores were written before 2026-12-07 by an encoder: they "
                   "count only the earlier copies of the query's token, not the later ones it also sees (a head on "
                   "every copy of its token scored about 0.5, not 1); rerun the analysis (a results folder's into a "
                   "new --results folder) for today's numbers.")


def score_definition(settings: dict, causal: bool) -> str:
    """The definition a document's duplicate-token and induction scores follow: its settings' score_definition, or,
    for a document written before it, today's on a causal model (the same numbers) and the earlier copies' on an
    encoder."""
    return settings.get("score_definition", SCORE_DEFINITION if causal else OLD_SCORE_DEFINITION)


def with_score_definition(data: dict) -> dict:
    """A validated headscope.results/1 document with settings.score_definition (score_definition's), so that a
    document read back from before it (an old report's) says which definition its numbers follow."""
    settings = data["settings"]
    if "score_definition" in settings:
        return data
    found = score_definition(settings, bool(data["model"].get("causal", True)))
    return {**data, "settings": {**settings, "score_definition": found}}


def json_floats(values) -> list:
    """A float array as nested lists of plain floats, with None (JSON null) where a value is undefined (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    out = values.astype(object)
    out[~np.isfinite(values)] = None
    return out.tolist()


def json_digits(values) -> list:
    """A float array as nested lists of floats at 9 significant digits: float32 precision, the precision the
    engine computes in, so the JSON carries no 17-digit noise. Idempotent: written, read and written again, the
    same numbers."""
    return np.vectorize(lambda v: float(f"{v:.9g}"), otypes=[object])(np.asarray(values, dtype=np.float64)).tolist()


def _float_or_none(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


@dataclass(frozen=True, eq=False)
class DpStats:
    """The notebook's same-head vs different-head dot products as statistics (see head_scores)."""

    mannwhitney_p: float | None  # two-sided Mann-Whitney U p-value, raw dot products; None if a group is empty
    rank_biserial: float | None  # 2U/(n_same n_diff) - 1, in [-1, 1]; > 0: same-head dot products are larger
    same_head_dp_centered: np.ndarray  # as same_head_dp, each key head's mean key removed
    diff_head_dp_centered: np.ndarray  # as diff_head_dp, each key head's mean key removed
    mannwhitney_p_centered: float | None
    rank_biserial_centered: float | None

    def to_dict(self) -> dict:
        return {**{name: _float_or_none(getattr(self, name)) for name in DP_FLOATS},
                **{name: json_digits(getattr(self, name)) for name in DP_ARRAYS}}

    @classmethod
    def from_dict(cls, data: dict) -> DpStats:
        return cls(**{name: _float_or_none(data.get(name)) for name in DP_FLOATS},
                   **{name: np.asarray(data[name], dtype=np.float64) for name in DP_ARRAYS})


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
    dp_stats: DpStats | None = None
    parity_score_max: float | None = None  # half precision: the largest |row maximum of the scores|, what the parity
    # tolerance scales with (analysis.parity); None (float32, or a document written before it): the absolute bound

    def to_dict(self, include_patterns: bool = False) -> dict:
        out = {name: json_digits(getattr(self, name)) for name in ARRAY_FIELDS}
        out["parity_max_abs_err"] = float(self.parity_max_abs_err)
        if _float_or_none(self.parity_score_max) is not None:
            out["parity_score_max"] = float(self.parity_score_max)
        out["kde"] = None if self.kde is None else {name: json_digits(values) for name, values in self.kde.items()}
        if include_patterns and self.patterns is not None:
            out["patterns"] = json_digits(self.patterns)
        if self.dp_stats is not None:
            out["dp_stats"] = self.dp_stats.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerResult:
        kde = data.get("kde")
        patterns = data.get("patterns")
        dp_stats = data.get("dp_stats")
        return cls(
            **{name: np.asarray(data[name], dtype=np.float64) for name in ARRAY_FIELDS},
            parity_max_abs_err=float(data["parity_max_abs_err"]),
            kde=None if kde is None else {name: np.asarray(values) for name, values in kde.items()},
            patterns=None if patterns is None else np.asarray(patterns, dtype=np.float32),
            dp_stats=None if dp_stats is None else DpStats.from_dict(dp_stats),
            parity_score_max=_float_or_none(data.get("parity_score_max")),
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
    head_scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layer, head], NaN where undefined
    exclude_current_token: bool = False  # the head detector's option (TransformerLens's)
    induction_probe: dict | None = None  # {"length", "seed"} when the input was the induction probe
    query_position: int | None = None  # absolute position of the query token (None: the final token, n_tokens - 1)
    query_choice: str = "the final token"  # how it was chosen: "chosen", or the default that applied
    exclude_special_keys: bool = False  # special tokens left out of the query's keys (dot products and read-out)
    exclude_bos: bool = True  # the head detector's exclude_bos setting: drop position 0 if it is a special token
    bos_excluded: bool | None = None  # whether position 0 was actually left out of the head scores
    score_definition: str = SCORE_DEFINITION  # the copies the duplicate-token and induction scores count

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def query(self) -> int:
        """The absolute position of the query token."""
        return self.n_tokens - 1 if self.query_position is None else self.query_position

    @property
    def query_token(self) -> str:
        return self.tokens[self.query]

    @property
    def causal(self) -> bool:
        return bool(self.model.get("causal", True))

    def _positions(self, found) -> np.ndarray:
        _, keys = found
        return np.arange(self.n_tokens)[keys]  # [keys]

    def dot_key_positions(self) -> np.ndarray:
        """The key positions of the dot products, in the engine's order (analysis.keys.compared_keys)."""
        if not self.n_tokens:
            return np.empty(0, dtype=np.int64)
        skip = self._special_mask() if self.exclude_special_keys else None
        return self._positions(compared_keys(self.n_tokens, self.exclude_first_token, self.query, causal=self.causal,
                                             skip=skip))

    def readout_key_positions(self) -> np.ndarray:
        """The key positions of the query's read-out (final_to_prev): earlier keys, or every other key."""
        if not self.n_tokens:
            return np.empty(0, dtype=np.int64)
        skip = self._special_mask() if self.exclude_special_keys else None
        return self._positions(query_keys(self.n_tokens, self.query, causal=self.causal, skip=skip))

    def _special_mask(self) -> np.ndarray:
        mask = np.zeros(self.n_tokens, dtype=bool)  # [pos]
        mask[list(self.special_positions)] = True
        return mask

    @property
    def first_token(self) -> str:
        """The token at position 0, the one "exclude first token" leaves out (often BOS or CLS)."""
        return self.tokens[0]

    def to_dict(self, include_patterns: bool = False) -> dict:
        return {
            "schema": SCHEMA,
            "model": {key: self.model.get(key) for key in MODEL_KEYS},
            "text": self.text,
            "tokens": list(self.tokens),
            "token_ids": [int(i) for i in self.token_ids],
            "special_positions": list(self.special_positions),
            "settings": {"exclude_first_token": self.exclude_first_token,
                         "exclude_current_token": self.exclude_current_token,
                         "induction_probe": self.induction_probe,
                         "query_position": self.query, "query_token": self.query_token,
                         "query_choice": self.query_choice, "exclude_special_keys": self.exclude_special_keys,
                         "exclude_bos": self.exclude_bos, "bos_excluded": bool(self.bos_excluded),
                         "score_definition": self.score_definition},
            "warnings": list(self.warnings),
            "layers": {str(layer): result.to_dict(include_patterns) for layer, result in sorted(self.layers.items())},
            "head_scores": {name: json_floats(values) for name, values in self.head_scores.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> AnalysisResult:
        if data.get("schema") != SCHEMA:
            raise HeadscopeError(f"Not a {SCHEMA} document (schema: {data.get('schema')!r}).")
        settings = data["settings"]
        tokens = tuple(data["tokens"])
        old_bos = bool(settings["exclude_first_token"])  # before exclude_bos existed, it was exclude_first_token
        return cls(
            model=dict(data["model"]),
            text=data["text"],
            tokens=tokens,
            token_ids=np.asarray(data["token_ids"], dtype=np.int64),
            special_positions=tuple(data.get("special_positions", ())),
            exclude_first_token=bool(data["settings"]["exclude_first_token"]),
            layers={int(key): LayerResult.from_dict(value) for key, value in data["layers"].items()},
            warnings=tuple(data.get("warnings", ())),
            head_scores={name: np.asarray(values, dtype=np.float64).reshape(len(values), -1)
                         for name, values in data.get("head_scores", {}).items()},
            exclude_current_token=bool(settings.get("exclude_current_token", False)),
            induction_probe=settings.get("induction_probe"),
            query_position=int(settings.get("query_position", len(tokens) - 1)),
            query_choice=str(settings.get("query_choice", "the final token")),
            exclude_special_keys=bool(settings.get("exclude_special_keys", False)),
            exclude_bos=bool(settings.get("exclude_bos", old_bos)),
            bos_excluded=bool(settings.get("bos_excluded", old_bos)),
            score_definition=score_definition(settings, bool(data["model"].get("causal", True))),
        )
