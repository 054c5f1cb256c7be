"""The neuron view: one head, one query token, one key token, dimension by dimension.

The unscaled dot product the notebook plots is a sum over the head's dimensions, q . k = sum_i q_i k_i; the view
shows each term q_i k_i (sorted by magnitude), the two vectors, and for every key the dot product and the softmax
weight the model gave it (the captured pattern row, parity-checked against the model's own eager attention).
With grouped-query attention query head h reads key head h // (H / G).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.capture import capture, capture_ids
from analysis.errors import HeadscopeError

POSITION_RANGE = "{what} position {pos} is out of range: the text has positions 0..{last}."
FUTURE_KEY = ("Key position {key} comes after query position {query}: in a causal model a query reads only "
              "itself and earlier tokens.")
HEAD_RANGE = "Head {head} is out of range: this model has heads 0..{last}."


@dataclass(frozen=True, eq=False)
class NeuronView:
    layer: int
    head: int
    kv_head: int  # the key head query head `head` reads
    query_pos: int
    key_pos: int
    tokens: tuple[str, ...]
    q: np.ndarray  # [d_head] the query vector at query_pos
    k: np.ndarray  # [d_head] the key vector at key_pos
    products: np.ndarray  # [d_head] q_i * k_i, in dimension order
    dot: float  # sum of products: the unscaled q . k
    dots: np.ndarray  # [k_pos] q . k for every key position
    weights: np.ndarray  # [k_pos] the head's softmax weights of this query (0 where masked)

    @property
    def order(self) -> np.ndarray:
        """[d_head] dimension indices by decreasing |q_i k_i|."""
        return np.argsort(-np.abs(self.products), kind="stable")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "kv_head": self.kv_head, "query_pos": self.query_pos,
                "key_pos": self.key_pos, "query_token": self.tokens[self.query_pos],
                "key_token": self.tokens[self.key_pos], "dot": self.dot, "q": self.q.tolist(), "k": self.k.tolist(),
                "products": self.products.tolist(), "dots": self.dots.tolist(), "weights": self.weights.tolist()}


def _position(pos: int, n: int, what: str) -> int:
    if not -n <= pos < n:
        raise HeadscopeError(POSITION_RANGE.format(what=what, pos=pos, last=n - 1))
    return pos % n


def compute_neuron_view(q: np.ndarray, k: np.ndarray, pattern_row: np.ndarray, head: int, query_pos: int,
                        key_pos: int | None = None, causal: bool = True, layer: int = 0,
                        tokens: tuple[str, ...] = ()) -> NeuronView:
    """From one layer's q [head, pos, d_head], k [kv_head, pos, d_head] and the head's pattern row for the query
    [k_pos]. `key_pos` None: the key the query attends to most. Negative positions count from the end."""
    n_heads, n = q.shape[0], q.shape[1]
    if not 0 <= head < n_heads:
        raise HeadscopeError(HEAD_RANGE.format(head=head, last=n_heads - 1))
    query_pos = _position(query_pos, n, "Query")
    weights = np.asarray(pattern_row, dtype=np.float64)  # [k_pos]
    key_pos = int(np.argmax(weights)) if key_pos is None else _position(key_pos, n, "Key")
    if causal and key_pos > query_pos:
        raise HeadscopeError(FUTURE_KEY.format(key=key_pos, query=query_pos))
    kv_head = head // (n_heads // k.shape[0])
    q_vec = q[head, query_pos].astype(np.float64)  # [d_head]
    keys = k[kv_head].astype(np.float64)  # [k_pos, d_head]
    products = q_vec * keys[key_pos]  # [d_head]
    dots = keys @ q_vec  # [k_pos, d] @ [d] -> [k_pos]
    return NeuronView(layer=layer, head=head, kv_head=kv_head, query_pos=query_pos, key_pos=key_pos,
                      tokens=tuple(tokens) or tuple(str(i) for i in range(n)), q=q_vec, k=keys[key_pos].copy(),
                      products=products, dot=float(products.sum()), dots=dots, weights=weights)


def neuron_view_from_capture(captured, layer: int, head: int, query_pos: int = -1, key_pos: int | None = None,
                             causal: bool = True) -> NeuronView:
    """The view from a capture that kept `layer`'s pattern (no model call)."""
    if layer not in captured.patterns:
        raise HeadscopeError(f"Layer {layer}'s attention pattern was not kept: capture it with keep_patterns=True.")
    n = len(captured.tokens)
    pattern = captured.patterns[layer]  # [head, q_pos, k_pos]
    if not 0 <= head < pattern.shape[0]:
        raise HeadscopeError(HEAD_RANGE.format(head=head, last=pattern.shape[0] - 1))
    row = pattern[head, _position(query_pos, n, "Query")]  # [k_pos]
    return compute_neuron_view(captured.q[layer], captured.k[layer], row, head, query_pos, key_pos, causal, layer,
                               captured.tokens)


def neuron_view(loaded, text_or_ids, layer: int, head: int, query_pos: int = -1,
                key_pos: int | None = None) -> NeuronView:
    """One forward pass (keeping `layer`'s pattern) on a text or on token ids as they are, then the view."""
    from analysis import check_layers

    check_layers([layer], loaded.info.n_layers)
    run = capture if isinstance(text_or_ids, str) else capture_ids
    captured = run(loaded, text_or_ids, pattern_layers=[layer], keep_patterns=True)
    return neuron_view_from_capture(captured, layer, head, query_pos, key_pos, loaded.info.causal)
