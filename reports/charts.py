"""Altair charts of one layer's results, shared by the Streamlit app and the HTML report.

Builders only draw: every number comes from an `AnalysisResult` (the KDE curves are scipy's values from
the results, never `transform_density`). Altair's 5,000-row limit stays on: long point clouds are thinned
to evenly spaced ranks (minimum, maximum and quantiles kept) and a heatmap of more than MAX_AXIS_CELLS
tokens is averaged over blocks of tokens; the chart's subtitle says when either happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd

from analysis.heads import key_head_of
from analysis.results import AnalysisResult
from reports.untrusted import visible

MAX_POINTS = 1500  # per group of a strip chart
MAX_AXIS_CELLS = 70  # heatmap cells per axis: 70 x 70 = 4,900 rows, under Altair's 5,000
WIDTH = 560
HEIGHT = 300
COLORS = {"Q": "#2f8f4e", "K": "#c0392b", "same": "#2f8f4e", "diff": "#c0392b", "first": "#3b6fb6"}
STRIP_GROUPS = ("Final to previous", "Self-attention, other tokens", "Self-attention, first token")
QUERY_GROUPS = {True: "Query to earlier keys", False: "Query to other tokens"}  # the read-out, causal or not
CAUSAL_NOTE = ("Under a causal mask the first token can attend only to itself, so its self-attention is always "
               "exactly 1.")
BIDIRECTIONAL_NOTE = ("This model is bidirectional: the first token attends to every token, so its self-attention is "
                      "not fixed at 1.")


@dataclass(frozen=True)
class LayerChart:
    """One chart of a layer, in display order: the app and the HTML report both iterate these."""

    key: str
    title: str
    explanation: str  # one sentence: what to look for
    chart: alt.Chart


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def key_head_label(layer: int, kv_head: int) -> str:
    return f"L{layer}K{kv_head}"


def display_token(token: str) -> str:
    """A token with its whitespace made visible: a leading space as '␣', a newline as '↵', control characters as
    reports.untrusted.visible draws them (␀, ⟨U+202E⟩, ...)."""
    return visible(token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")) or "∅"


def query_name(result: AnalysisResult) -> str:
    """The query token as titles and captions name it: "query token 7 'cat'"."""
    if not result.tokens:
        return "query token"
    return f"query token {result.query} '{display_token(result.query_token)}'"


def query_group(result: AnalysisResult) -> str:
    """The read-out's name: "Query to earlier keys" (causal) or "Query to other tokens" (bidirectional)."""
    return QUERY_GROUPS[result.causal]


def strip_groups(result: AnalysisResult) -> tuple[str, str, str]:
    return (query_group(result), *STRIP_GROUPS[1:])


def keys_description(result: AnalysisResult) -> str:
    """Which keys the dot products use, in words."""
    where = "earlier positions" if result.causal else "every other position"
    left_out = [name for name, on in (("the first", result.exclude_first_token),
                                      ("special tokens", result.exclude_special_keys)) if on]
    return where + (" except " + " and ".join(left_out) if left_out else "")


def readout_description(result: AnalysisResult) -> str:
    """Which keys the query's softmax read-out uses, in words: the first token is never left out of it (its weight
    on position 0 is the sink the weights show), only the special tokens with exclude special keys."""
    where = "earlier positions" if result.causal else "every other position"
    return where + (" except special tokens" if result.exclude_special_keys else "")


def _title(result: AnalysisResult, layer: int, what: str, subtitle: str | list[str] = "") -> alt.TitleParams:
    return alt.TitleParams(f"{what} · layer {layer} · {result.model['id']}", subtitle=subtitle or [], anchor="start")


def _layer(result: AnalysisResult, layer: int):
    if layer not in result.layers:
        raise KeyError(f"Layer {layer} is not in these results (layers: {sorted(result.layers)}).")
    return result.layers[layer]


def _n_heads(result: AnalysisResult) -> int:
    return int(result.model["n_heads"])


def _groups(result: AnalysisResult) -> np.ndarray:
    """[head] -> the key head each query head reads."""
    return key_head_of(_n_heads(result), int(result.model["n_kv_heads"]))


def _thin(frame: pd.DataFrame, column: str, limit: int = MAX_POINTS) -> tuple[pd.DataFrame, str]:
    """At most `limit` rows, evenly spaced by rank of `column` (keeps min, max and the quantiles)."""
    if len(frame) <= limit:
        return frame, ""
    order = np.argsort(frame[column].to_numpy(), kind="stable")
    picks = order[np.round(np.linspace(0, len(frame) - 1, limit)).astype(int)]
    return frame.iloc[np.sort(picks)], f"{limit:,} of {len(frame):,}"


def _strip(frame: pd.DataFrame, groups: list[str], colors: list[str], y_title: str, tooltip: list) -> alt.LayerChart:
    x = alt.X("group:N", sort=groups, title=None, axis=alt.Axis(labelAngle=0, labelLimit=220))
    # Jitter from the row number (golden-ratio steps, uniform in [-2.5, 2.5]): deterministic, and computed in the
    # chart, so a report stores no jitter column.
    jittered = alt.Chart(frame).transform_window(row="row_number()").transform_calculate(
        jitter="5 * ((datum.row * 0.6180339887) % 1) - 2.5")
    points = jittered.mark_circle(size=36, opacity=0.55, stroke="black", strokeWidth=0.4).encode(
        x=x,
        xOffset=alt.XOffset("jitter:Q", scale=alt.Scale(domain=[-4, 4]), title=None),
        y=alt.Y("value:Q", title=y_title),
        color=alt.Color("group:N", sort=groups, scale=alt.Scale(domain=groups, range=colors), legend=None),
        tooltip=tooltip,
    )
    zero = alt.Chart(pd.DataFrame({"value": [0.0]})).mark_rule(strokeDash=[4, 4], color="#999").encode(
        y=alt.Y("value:Q"))
    return alt.layer(zero, points).properties(width=WIDTH, height=HEIGHT)


# ----------------------------------------------------------------------------------------- descriptives


def build_means_chart(result: AnalysisResult, layer: int) -> alt.LayerChart:
    """The notebook's 'Means and stds': Q (per query head) and K (per key head) means with std error bars."""
    data = _layer(result, layer)
    n_heads, groups = _n_heads(result), _groups(result)
    group_size = n_heads // max(len(data.k_means), 1)
    rows = [{"kind": "Q", "label": head_label(layer, h), "x": h - 0.2, "mean": data.q_means[h], "std": data.q_stds[h],
             "reads": f"reads key head {key_head_label(layer, int(groups[h]))}"} for h in range(len(data.q_means))]
    for g in range(len(data.k_means)):
        readers = [head_label(layer, h) for h in range(n_heads) if groups[h] == g]
        rows.append({"kind": "K", "label": key_head_label(layer, g), "x": g * group_size + (group_size - 1) / 2 + 0.2,
                     "mean": data.k_means[g], "std": data.k_stds[g], "reads": "key head of " + ", ".join(readers)})
    frame = pd.DataFrame(rows, columns=["kind", "label", "x", "mean", "std", "reads"]).astype({"x": float})
    frame["low"], frame["high"] = frame["mean"] - frame["std"], frame["mean"] + frame["std"]
    # colour and shape share field, title and legend, so Vega-Lite draws one legend with both (STYLE.md: a null
    # legend on either would remove the merged legend)
    legend = alt.Legend(orient="top", labelExpr="datum.label == 'Q' ? 'Q, per query head' : 'K, per key head'")
    color = alt.Color("kind:N", title="Mean ± std of", legend=legend,
                      scale=alt.Scale(domain=["Q", "K"], range=[COLORS["Q"], COLORS["K"]]))
    x = alt.X("x:Q", title="Query head (key heads at the query heads that read them)",
              axis=alt.Axis(values=list(range(n_heads)), labelExpr="'H' + datum.value", grid=False),
              scale=alt.Scale(domain=[-0.8, n_heads - 0.2]))
    tooltip = [alt.Tooltip("label:N", title="head"), alt.Tooltip("mean:Q", title="Mean", format=".4f"),
               alt.Tooltip("std:Q", title="Standard deviation", format=".4f"), alt.Tooltip("reads:N", title="")]
    base = alt.Chart(frame).encode(x=x, color=color, tooltip=tooltip)
    bars = base.mark_rule(strokeWidth=1.5).encode(y=alt.Y("low:Q", title="Activation"), y2=alt.Y2("high:Q"))
    points = base.mark_point(filled=True, size=60, stroke="black", strokeWidth=0.6).encode(
        y=alt.Y("mean:Q"), shape=alt.Shape("kind:N", title="Mean ± std of", legend=legend,
                                    scale=alt.Scale(domain=["Q", "K"], range=["square", "circle"])))
    subtitle = "Over positions 1..T-1 (first token excluded)" if result.exclude_first_token else "Over every position"
    return alt.layer(bars, points).properties(
        title=_title(result, layer, "Q and K means ± std per head", subtitle), width=WIDTH, height=HEIGHT)


def _paired(result: AnalysisResult, layer: int, q_values: np.ndarray, k_values: np.ndarray) -> pd.DataFrame:
    """One row per query head, paired with the key head it reads."""
    groups = _groups(result)
    return pd.DataFrame(
        [{"head": head_label(layer, h), "key_head": key_head_label(layer, int(groups[h])), "q": q_values[h],
          "k": k_values[groups[h]]} for h in range(min(len(q_values), len(groups))) if len(k_values)],
        columns=["head", "key_head", "q", "k"])


def _scatter(frame: pd.DataFrame, result: AnalysisResult, layer: int, what: str, shape: str) -> alt.Chart:
    return alt.Chart(frame).mark_point(shape=shape, filled=True, size=110, color="#9e9e9e", stroke="black",
                                       strokeWidth=0.8).encode(
        x=alt.X("q:Q", title="Q (query head)", scale=alt.Scale(zero=False)),
        y=alt.Y("k:Q", title="K (its key head)", scale=alt.Scale(zero=False)),
        tooltip=[alt.Tooltip("head:N", title="query head"), alt.Tooltip("key_head:N", title="key head"),
                 alt.Tooltip("q:Q", title="Q", format=".4f"), alt.Tooltip("k:Q", title="K", format=".4f")],
    ).properties(title=_title(result, layer, what), width=WIDTH // 2 + 60, height=HEIGHT)


def build_qk_means_chart(result: AnalysisResult, layer: int) -> alt.Chart:
    """The notebook's 'Average activations': each query head's Q mean against its key head's K mean."""
    data = _layer(result, layer)
    return _scatter(_paired(result, layer, data.q_means, data.k_means), result, layer, "Q vs K means", "diamond")


def build_qk_stds_chart(result: AnalysisResult, layer: int) -> alt.Chart:
    """The notebook's 'Standard deviations': each query head's Q std against its key head's K std."""
    data = _layer(result, layer)
    return _scatter(_paired(result, layer, data.q_stds, data.k_stds), result, layer, "Q vs K standard deviations",
                    "triangle-up")


# ----------------------------------------------------------------------------------------- dot products


def _dot_product_frame(result: AnalysisResult, layer: int) -> pd.DataFrame:
    """Every same-head and cross-head dot product with its query head, key head and key token.

    The engine orders them query head outer, key head inner, key position innermost (result.dot_key_positions).
    """
    data = _layer(result, layer)
    n_heads, groups = _n_heads(result), _groups(result)
    n_kv = int(result.model["n_kv_heads"])
    positions = result.dot_key_positions()
    pairs = [(h, g) for h in range(n_heads) for g in range(n_kv)]
    frames = []
    for name, values, keep in (("Same head", data.same_head_dp, lambda h, g: groups[h] == g),
                               ("Different heads", data.diff_head_dp, lambda h, g: groups[h] != g)):
        chosen = [(h, g) for h, g in pairs if keep(h, g)]
        if len(values) != len(chosen) * len(positions):  # short text: nothing to label
            continue
        heads = np.repeat([head_label(layer, h) for h, _ in chosen], len(positions))
        keys = np.repeat([key_head_label(layer, g) for _, g in chosen], len(positions))
        tokens = np.tile([f"{p}: {display_token(result.tokens[p])}" for p in positions], len(chosen))
        frames.append(pd.DataFrame({"group": name, "value": values, "query_head": heads, "key_head": keys,
                                    "key_token": tokens}))
    columns = ["group", "value", "query_head", "key_head", "key_token"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def build_dot_products_chart(result: AnalysisResult, layer: int) -> alt.LayerChart:
    """The notebook's 'Raw attention scores': unscaled q·k of the query token, same head vs different heads."""
    frame = _dot_product_frame(result, layer)
    parts, notes = [], []
    for name in ("Same head", "Different heads"):
        part, note = _thin(frame[frame["group"] == name], "value")
        parts.append(part)
        if note:
            notes.append(f"{name}: {note} points shown, evenly spaced by rank")
    frame = pd.concat(parts, ignore_index=True)
    tooltip = [alt.Tooltip("group:N", title=""), alt.Tooltip("value:Q", title="q·k", format=".3f"),
               alt.Tooltip("query_head:N", title="query head"), alt.Tooltip("key_head:N", title="key head"),
               alt.Tooltip("key_token:N", title="key token")]
    chart = _strip(frame, ["Same head", "Different heads"], [COLORS["same"], COLORS["diff"]], "q·kᵀ dot product",
                   tooltip)
    subtitle = [f"Query: {query_name(result)} ({result.query_choice}); keys: {keys_description(result)}"]
    return chart.properties(title=_title(result, layer, "Raw attention scores (q·k)", subtitle + notes))


def build_dot_distributions_chart(result: AnalysisResult, layer: int) -> alt.LayerChart:
    """The notebook's 'Distributions': histograms (30 and 80 bins) of the dot products, each over its maximum."""
    data = _layer(result, layer)
    rows = []
    for name, values, bins in (("Same head", data.same_head_dp, 30), ("Different heads", data.diff_head_dp, 80)):
        if len(values) == 0:
            continue
        counts, edges = np.histogram(values, bins=bins)
        rows += [{"group": name, "value": float(edge), "proportion": float(c) / counts.max(), "count": int(c)}
                 for edge, c in zip(edges[:-1], counts)]
    frame = pd.DataFrame(rows, columns=["group", "value", "proportion", "count"])
    groups = ["Same head", "Different heads"]
    lines = alt.Chart(frame).mark_line(strokeWidth=2.5, interpolate="step-after").encode(
        x=alt.X("value:Q", title="Dot product value"),
        y=alt.Y("proportion:Q", title="Proportion (normalised to max)"),
        color=alt.Color("group:N", title=None, sort=groups,
                        scale=alt.Scale(domain=groups, range=[COLORS["same"], COLORS["diff"]])),
        tooltip=[alt.Tooltip("group:N", title=""), alt.Tooltip("value:Q", title="bin from", format=".3f"),
                 alt.Tooltip("count:Q", title="count")],
    )
    zero = alt.Chart(pd.DataFrame({"value": [0.0]})).mark_rule(strokeDash=[4, 4], color="#999").encode(
        x=alt.X("value:Q"))
    return alt.layer(zero, lines).properties(
        title=_title(result, layer, "Distributions of q·k",
                     f"Query: {query_name(result)}; histograms: 30 bins (same head), 80 bins (different heads)"),
        width=WIDTH, height=HEIGHT)


# ----------------------------------------------------------------------------------------- softmax weights


def _softmax_frame(result: AnalysisResult, layer: int) -> pd.DataFrame:
    data = _layer(result, layer)
    n_heads, n = _n_heads(result), result.n_tokens
    tok = [f"{p}: {display_token(t)}" for p, t in enumerate(result.tokens)]
    heads = [head_label(layer, h) for h in range(n_heads)]
    frames = []
    keys = result.readout_key_positions()  # [keys]
    if keys.size and len(data.final_to_prev) == n_heads * keys.size:
        frames.append(pd.DataFrame({"group": query_group(result), "value": data.final_to_prev,
                                    "head": np.repeat(heads, keys.size), "query": tok[result.query],
                                    "key": [tok[j] for j in keys] * n_heads}))
    if n >= 2 and len(data.self_attention) == n_heads * (n - 1):
        frames.append(pd.DataFrame({"group": STRIP_GROUPS[1], "value": data.self_attention,
                                    "head": np.repeat(heads, n - 1), "query": tok[1:] * n_heads,
                                    "key": tok[1:] * n_heads}))
    if len(data.first_self) == n_heads and tok:
        frames.append(pd.DataFrame({"group": STRIP_GROUPS[2], "value": data.first_self, "head": heads,
                                    "query": tok[0], "key": tok[0]}))
    columns = ["group", "value", "head", "query", "key"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def build_softmax_chart(result: AnalysisResult, layer: int) -> alt.LayerChart:
    """The notebook's softmax strip: the query to its keys (the notebook's final-to-previous), self-attention of
    other tokens, of the first token."""
    frame = _softmax_frame(result, layer)
    parts, notes = [], []
    groups = strip_groups(result)
    for name in groups:
        part, note = _thin(frame[frame["group"] == name], "value")
        parts.append(part)
        if note:
            notes.append(f"{name}: {note} points shown, evenly spaced by rank")
    frame = pd.concat(parts, ignore_index=True)
    tooltip = [alt.Tooltip("group:N", title=""), alt.Tooltip("value:Q", title="weight", format=".4f"),
               alt.Tooltip("head:N", title="head"), alt.Tooltip("query:N", title="query token"),
               alt.Tooltip("key:N", title="key token")]
    chart = _strip(frame, list(groups), [COLORS["same"], COLORS["diff"], COLORS["first"]],
                   "Softmax attention weight", tooltip)
    note = CAUSAL_NOTE if result.model.get("causal") else BIDIRECTIONAL_NOTE
    return chart.properties(title=_title(result, layer, "Softmax attention weights",
                                         [f"{groups[0]}: {query_name(result)}. {note}"] + notes))


def build_sink_mass_chart(result: AnalysisResult, layer: int) -> alt.Chart:
    """Per head, the mean attention that queries 1..T-1 give to the first token (the sink mass)."""
    data = _layer(result, layer)
    labels = [head_label(layer, h) for h in range(len(data.sink_mass))]
    frame = pd.DataFrame({"head": labels, "sink_mass": data.sink_mass.astype(float)})
    first = display_token(result.tokens[0]) if result.tokens else "?"
    return alt.Chart(frame).mark_bar(color=COLORS["first"]).encode(
        x=alt.X("head:N", sort=labels, title="Query head", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("sink_mass:Q", title="Mean weight on the first token", scale=alt.Scale(domain=[0, 1])),
        tooltip=[alt.Tooltip("head:N", title="head"), alt.Tooltip("sink_mass:Q", title="sink mass", format=".4f")],
    ).properties(title=_title(result, layer, "Sink mass per head",
                              f"Mean attention from queries 1..T-1 to position 0 ({first})"),
                 width=WIDTH, height=HEIGHT - 60)


def build_kde_chart(result: AnalysisResult, layer: int) -> alt.Chart:
    """The notebook's KDE of the query's weights (final-to-previous) and self-attention: scipy's curves."""
    data = _layer(result, layer)
    series = {"final_to_prev": query_group(result), "self_attention": "Self-attention"}
    if data.kde is None:
        frame = pd.DataFrame(columns=["weight", "density", "series"])
        subtitle = "Too few weights for a density estimate (fewer than 2, or all equal)"
    else:
        frame = pd.concat([pd.DataFrame({"weight": data.kde["grid"], "density": data.kde[name], "series": label})
                           for name, label in series.items()], ignore_index=True)
        subtitle = [f"{query_group(result)}: {query_name(result)}",
                    ("scipy gaussian_kde (Scott's bandwidth), each curve over its maximum; square-root y axis shows "
                     "the tails")]
    domain = list(series.values())
    return alt.Chart(frame).mark_line(strokeWidth=2.5).encode(
        x=alt.X("weight:Q", title="Softmax attention weight", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("density:Q", title="KDE (normalised)", scale=alt.Scale(type="sqrt", domain=[0, 1])),
        color=alt.Color("series:N", title=None, scale=alt.Scale(domain=domain, range=[COLORS["same"], COLORS["diff"]])),
        tooltip=[alt.Tooltip("series:N", title=""), alt.Tooltip("weight:Q", title="attention weight", format=".3f"),
                 alt.Tooltip("density:Q", title="density", format=".4f")],
    ).properties(title=_title(result, layer, "KDE of attention weights", subtitle), width=WIDTH, height=HEIGHT - 60)


# ----------------------------------------------------------------------------------------- heatmap


def _block_label(result: AnalysisResult, start: int, stop: int) -> tuple[str, str]:
    """Axis label and tooltip text for positions start..stop-1."""
    tokens = "".join(result.tokens[start:stop])
    text = display_token(tokens if len(tokens) <= 40 else tokens[:39] + "…")
    if stop - start == 1:
        return f"{start}: {text}", text
    return f"{start}–{stop - 1}", text


def build_heatmap_chart(result: AnalysisResult, layer: int, head: int,
                        positions: tuple[int, int] | None = None) -> alt.Chart | None:
    """The selected head's attention pattern, tokens on both axes; None when the results hold no patterns.

    `positions` (start, stop) zooms to that square of the pattern. More than MAX_AXIS_CELLS positions are
    drawn as blocks of tokens: a cell is the attention a query of the row block gives to the whole column
    block, averaged over the row block's queries (so each row of cells still sums to 1).
    """
    data = _layer(result, layer)
    if data.patterns is None:
        return None
    if not 0 <= head < data.patterns.shape[0]:
        raise ValueError(f"Head {head} is out of range: this layer has heads 0..{data.patterns.shape[0] - 1}.")
    n = data.patterns.shape[1]
    start, stop = (0, n) if positions is None else (max(0, positions[0]), min(n, positions[1]))
    if stop <= start:
        raise ValueError(f"Empty position range {positions} for a text of {n} tokens.")
    pattern = data.patterns[head, start:stop, start:stop].astype(np.float64)  # [q_pos, k_pos] of the window
    size = math.ceil((stop - start) / MAX_AXIS_CELLS)  # tokens per block
    edges = np.arange(0, stop - start, size)  # block starts, relative to `start`
    counts = np.diff(np.append(edges, stop - start))  # [block] queries per block
    cells = np.add.reduceat(np.add.reduceat(pattern, edges, axis=1), edges, axis=0) / counts[:, None]  # [block, block]
    labels = [_block_label(result, start + a, start + a + c) for a, c in zip(edges, counts)]
    axis_labels = [label for label, _ in labels]
    rows, cols = np.indices(cells.shape)  # [block, block] each
    frame = pd.DataFrame({
        "query": [axis_labels[i] for i in rows.ravel()],
        "key": [axis_labels[j] for j in cols.ravel()],
        "query_token": [labels[i][1] for i in rows.ravel()],
        "key_token": [labels[j][1] for j in cols.ravel()],
        "weight": cells.ravel(),
    })
    subtitle = [f"Rows: query tokens; columns: key tokens (positions {start}–{stop - 1} of {n})"]
    if size > 1:
        subtitle.append(f"{stop - start} tokens drawn as blocks of {size}: a cell is the attention a query of the row "
                        "block gives to the column block, averaged over the row block; zoom in for single tokens")
    side = int(min(max(11 * len(axis_labels), 260), 720))
    axis = alt.Axis(labelFontSize=9, labelLimit=120, labelOverlap=False)
    return alt.Chart(frame).mark_rect().encode(
        x=alt.X("key:O", sort=axis_labels, title="Key", axis=axis),
        y=alt.Y("query:O", sort=axis_labels, title="Query", axis=axis),
        color=alt.Color("weight:Q", title="Weight", scale=alt.Scale(scheme="blues", type="sqrt", domain=[0, 1])),
        tooltip=[alt.Tooltip("query_token:N", title="query token"), alt.Tooltip("key_token:N", title="key token"),
                 alt.Tooltip("query:N", title="query position"), alt.Tooltip("key:N", title="key position"),
                 alt.Tooltip("weight:Q", title="attention weight", format=".4f")],
    ).properties(title=_title(result, layer, f"Attention pattern of {head_label(layer, head)}", subtitle),
                 width=side, height=side)


# ----------------------------------------------------------------------------------------- all of a layer


def build_layer_charts(result: AnalysisResult, layer: int, head: int = 0,
                       positions: tuple[int, int] | None = None, keys=None) -> list[LayerChart]:
    """Every chart of one layer, in display order; the heatmap only when the results hold patterns.

    `keys` (an iterable of LayerChart keys), if given, builds only those (the app builds only what it draws).
    """
    causal_hint = ("spikes of the query's weights on earlier keys point to previous-token heads"
                   if result.model.get("causal")
                   else "a bidirectional model spreads weight both ways")
    plan = [
        ("means", "Q and K means ± std per head",
         ("Look for heads whose Q or K mean sits far from zero or whose spread is much wider than the others': "
         "they stand out before any attention is computed."), lambda: build_means_chart(result, layer)),
        ("qk_means", "Q vs K means",
         ("Each point is a query head against the key head it reads; heads far from the cloud have queries and "
         "keys offset differently from the rest."), lambda: build_qk_means_chart(result, layer)),
        ("qk_stds", "Q vs K standard deviations",
         "Heads with large Q and K spreads produce large dot products and therefore sharp, peaked attention.",
         lambda: build_qk_stds_chart(result, layer)),
        ("dot_products", "Raw attention scores (q·k)",
         (f"The {query_name(result)} against {keys_description(result)}. If same-head dot products spread wider "
          "than cross-head ones, each head's queries are tuned to its own keys, which is why attention is computed "
          "within heads."),
         lambda: build_dot_products_chart(result, layer)),
        ("dot_distributions", "Distributions of q·k",
         (f"The dot products of the {query_name(result)}. Compare the widths: a wider same-head curve means queries "
          "line up with their own head's keys more than with other heads' keys."),
         lambda: build_dot_distributions_chart(result, layer)),
        ("softmax", "Softmax attention weights",
         (f"{query_group(result)}: the {query_name(result)}. Most weights sit near 0; the few large ones are where "
          f"a head actually looks ({causal_hint})."),
         lambda: build_softmax_chart(result, layer)),
        ("sink_mass", "Sink mass per head",
         ("A head with sink mass near 1 parks its attention on the first token (an attention sink) and reads "
         "little else."), lambda: build_sink_mass_chart(result, layer)),
        ("kde", "KDE of attention weights",
         "Where each curve's mass lies: a bump near 1 means some heads attend almost entirely to one token.",
         lambda: build_kde_chart(result, layer)),
    ]
    wanted = None if keys is None else set(keys)
    charts = [LayerChart(key, title, explanation, build()) for key, title, explanation, build in plan
              if wanted is None or key in wanted]
    if wanted is None or "heatmap" in wanted:
        heatmap = build_heatmap_chart(result, layer, head, positions)
        if heatmap is not None:
            charts.append(LayerChart("heatmap", f"Attention pattern of {head_label(layer, head)}",
                                     "Bright cells show which tokens each query reads: a bright first column is an "
                                     "attention sink, a bright line just below the diagonal a previous-token head.",
                                     heatmap))
    return charts


# ----------------------------------------------------------------------------------------- head atlas

ATLAS_SELECTION = "atlas_head"  # the point selection's name: fixed, so the same results give the same spec bytes
ATLAS_VIEW = "atlas_cells"  # the view holding it (Altair would otherwise number views with a global counter)
SCORE_TITLES = {
    "previous_token": "Previous-token score",
    "duplicate_token": "Duplicate-token score",
    "induction": "Induction score",
    "sink": "Sink score",
    "self": "Self-attention score",
    "entropy": "Attention entropy (nats)",
    "q_mean": "Q mean",
    "q_std": "Q standard deviation",
    "k_mean": "K mean (of the key head read)",
    "k_std": "K standard deviation (of the key head read)",
}
SCORE_EXPLANATIONS = {
    "previous_token": "The share of each head's attention that goes to the token just before the query: near 1 marks a "
                      "previous-token head.",
    "duplicate_token": "The share of attention that goes to the other copies of the query's own token that it sees "
                       "(the earlier ones on a causal model, earlier and later ones on an encoder): high values mark "
                       "duplicate-token heads (only texts with repeated tokens can show them).",
    "induction": "The share of attention that goes to the token right after each other copy of the query's token that "
                 "it sees (after earlier copies on a causal model, after later ones too on an encoder): high values "
                 "mark induction heads (the induction probe's repeated random tokens make this meaningful whatever "
                 "the text).",
    "sink": "The mean attention that queries after the first give to position 0: near 1 marks a head that parks its "
            "attention on the first token (an attention sink).",
    "self": "The mean attention each query gives to itself (the first query left out): high values mark heads that "
            "mostly read their own position.",
    "entropy": "The mean entropy of each query's attention in nats: low values are sharp, focused heads, high values "
               "heads that spread their attention evenly.",
    "q_mean": "Each query head's mean activation over positions and dimensions.",
    "q_std": "Each query head's spread: large Q and K spreads give large dot products and sharp attention.",
    "k_mean": "The mean activation of the key head each query head reads.",
    "k_std": "The spread of the key head each query head reads.",
}


SELECTED_OUTLINE = "#ff2b6e"  # the selected head's outline: visible on viridis' purple and yellow alike
SHARE_SCORES = ("previous_token", "duplicate_token", "induction", "sink", "self")  # shares of attention: [0, 1]
SIGNED_SCORES = ("q_mean", "k_mean")  # either sign: a diverging scheme centred on 0
LEGEND_TITLES = {**dict.fromkeys(SHARE_SCORES, "Share"), "entropy": "Nats", "q_mean": "Q mean", "q_std": "Q std",
                 "k_mean": "K mean", "k_std": "K std"}  # short: the chart's title names the score in full


def max_entropy(n_tokens: int, causal: bool, window: int | None = None) -> float:
    """The largest mean entropy (nats) of query rows 1..T-1: every query spread evenly over the keys it sees.

    A causal query at position i sees i + 1 keys, at most `window` under a sliding window (the model's
    attention_windows), a bidirectional one all T: the means of ln(min(i + 1, window)) and ln(T). A bidirectional
    sliding window of `window` = 2w + 1 keys (loading.attention_windows) shows a query the keys within w of it on
    either side: min(i, w) + 1 + min(T - 1 - i, w).
    """
    if n_tokens < 2:
        return 0.0
    if not causal and not window:
        return math.log(n_tokens)
    i = np.arange(1, n_tokens)  # [query]: rows 1..T-1, what the entropy score averages
    if causal:
        return float(np.log(i + 1 if not window else np.minimum(i + 1, window)).mean())
    side = (window - 1) // 2
    return float(np.log(np.minimum(i, side) + 1 + np.minimum(n_tokens - 1 - i, side)).mean())


def layer_max_entropies(model: dict, n_tokens: int) -> np.ndarray:
    """[layer]: max_entropy of each layer of `model` (a results' model dict), under the layer's sliding window."""
    windows = model.get("attention_windows") or [None] * int(model["n_layers"])  # older results: no window
    return np.array([max_entropy(n_tokens, bool(model.get("causal")), window) for window in windows])


def atlas_scale(score: str, values: np.ndarray, entropy_max: float | None = None) -> alt.Scale:
    """An honest colour scale: shares on a fixed [0, 1], signed values diverging around 0, entropy from 0 to
    its maximum, spreads from 0; never stretched to the data's own maximum for a bounded score."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    if score in SHARE_SCORES:
        return alt.Scale(scheme="viridis", domain=[0, 1])
    if score in SIGNED_SCORES:
        return alt.Scale(scheme="redblue", reverse=True, domain=[-top, top], domainMid=0)
    if score == "entropy" and entropy_max:
        return alt.Scale(scheme="viridis", domain=[0, round(entropy_max, 3)])
    return alt.Scale(scheme="viridis", domain=[0, top or 1.0])


def _atlas_chart(frame: pd.DataFrame, n_layers: int, n_heads: int, value_title: str, title: alt.TitleParams,
                 tooltip: list, scale: alt.Scale | None = None,
                 selected: tuple[int, int] | None = None) -> alt.LayerChart:
    """A layers x heads grid: grey cells for every head (undefined values stay grey), coloured where defined.

    Clicking a cell selects its layer and head (point selection ATLAS_SELECTION on fields layer, head); `selected`
    (layer, head) starts the selection there, outlined, so the chart shows the head the page shows.
    """
    initial = {} if selected is None else {"value": [{"layer": int(selected[0]), "head": int(selected[1])}]}
    selection = alt.selection_point(name=ATLAS_SELECTION, fields=["layer", "head"], on="click", clear=False,
                                    empty=False, **initial)
    x = alt.X("head:O", title="Head", axis=alt.Axis(labelAngle=0), scale=alt.Scale(domain=list(range(n_heads))))
    y = alt.Y("layer:O", title="Layer", scale=alt.Scale(domain=list(range(n_layers))))
    # typed channels: Altair gives a plain dict (alt.condition's) its class by hashing ~2,300 schemas, each time
    outline = alt.StrokeValue(**alt.condition(selection, alt.value(SELECTED_OUTLINE), alt.value("white")))
    width = alt.StrokeWidthValue(**alt.condition(selection, alt.value(3), alt.value(1)))
    base = alt.Chart(frame).transform_calculate(label="'L' + datum.layer + 'H' + datum.head")  # L{layer}H{head}
    cells = base.mark_rect(color="#e6e6e6").encode(
        x=x, y=y, tooltip=tooltip, stroke=outline, strokeWidth=width,
    ).add_params(selection).properties(name=ATLAS_VIEW)
    defined = base.transform_filter("isValid(datum.value)").mark_rect().encode(
        x=x, y=y, tooltip=tooltip, stroke=outline, strokeWidth=width,
        color=alt.Color("value:Q", title=value_title, scale=scale or alt.Scale(scheme="viridis"),
                        legend=alt.Legend(format=".2~f", titleLimit=260)),
    )
    size = int(min(max(22 * max(n_heads, n_layers), 240), 640))
    return alt.layer(cells, defined).properties(title=title, width=size, height=int(size * n_layers / max(n_heads, 1)))


def _significant(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """Values rounded to `digits` significant digits (NaN kept), so the chart data stays short."""
    values = np.asarray(values, dtype=np.float64)
    return np.array([float(f"{v:.{digits}g}") for v in values])


def _atlas_frame(values: np.ndarray, **extra: np.ndarray) -> pd.DataFrame:
    """One row per layer x head: layer, head, value (None where undefined) and `extra`; 6 significant digits.

    The label L{layer}H{head} is computed in the chart (a calculate transform): the report embeds one atlas per
    score, so every byte per row counts. The tables and the results JSON keep the full values.
    """
    layers, heads = np.indices(values.shape)  # [layer, head] each
    columns = {"layer": layers.ravel(), "head": heads.ravel(), "value": _significant(values.ravel())}
    columns.update({name: _significant(array.ravel()) for name, array in extra.items()})
    frame = pd.DataFrame(columns)
    return frame.astype(object).where(frame.notna(), None).astype({"layer": int, "head": int})


def build_atlas_chart(result: AnalysisResult, score: str, selected: tuple[int, int] | None = None) -> alt.LayerChart:
    """One head score for every layer x head of the model; undefined (NaN) cells stay grey; click selects a head.

    `selected` (layer, head), if given, is outlined from the start (the app passes the head it shows).
    """
    if score not in result.head_scores:
        raise KeyError(f"No head score {score!r} in these results (scores: {sorted(result.head_scores)}).")
    values = np.asarray(result.head_scores[score], dtype=np.float64)  # [layer, head]
    what = SCORE_TITLES.get(score, score)
    source = (f"induction probe: {result.induction_probe['length']} random tokens, repeated, seed "
              f"{result.induction_probe['seed']}" if result.induction_probe else f"{result.n_tokens} tokens")
    subtitle = [f"Every layer x head, {source}; grey: undefined"]
    layer_max = layer_max_entropies(result.model, result.n_tokens)  # [layer]
    entropy_max = float(layer_max.max())  # the atlas's: a sliding-window layer's queries see fewer keys
    legend_title = LEGEND_TITLES.get(score, what)
    if score == "entropy":
        legend_title = f"Nats (max {entropy_max:.2f})"
        subtitle.append(f"0 nats: all attention on one key; {entropy_max:.2f} nats (the maximum): spread evenly "
                        "over every key a query sees")
        lower = {}  # {rounded maximum: [layer]} of the sliding-window layers that cannot reach the atlas's
        for layer, top in enumerate(layer_max):
            if f"{top:.2f}" != f"{entropy_max:.2f}":
                lower.setdefault(f"{top:.2f}", []).append(layer)
        for top, layers in lower.items():
            window = result.model["attention_windows"][layers[0]]
            subtitle.append(f"Layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}: at most {top} "
                            f"nats (a sliding window of {window} keys)")
    title = alt.TitleParams(f"{what} per head · {result.model['id']}", anchor="start", subtitle=subtitle)
    tooltip = [alt.Tooltip("label:N", title="Head"), alt.Tooltip("value:Q", title=what, format=".4f")]
    return _atlas_chart(_atlas_frame(values), *values.shape, legend_title, title, tooltip,
                        atlas_scale(score, values, entropy_max), selected)


def build_corpus_atlas_chart(corpus, score: str) -> alt.LayerChart:
    """The mean of one per-head number over a corpus's texts, with its bootstrap interval in the tooltip."""
    if score not in corpus.values:
        raise KeyError(f"No per-head number {score!r} in this corpus (numbers: {sorted(corpus.values)}).")
    what = SCORE_TITLES.get(score, score)
    frame = _atlas_frame(corpus.means[score], low=corpus.low[score], high=corpus.high[score],
                         n=np.isfinite(corpus.values[score]).sum(axis=0))
    level = f"{corpus.level:.0%}"
    subtitle = (f"{level} bootstrap intervals ({corpus.n_boot} resamples of the texts, seed {corpus.seed}) in the "
                "tooltips; grey: undefined")
    title = alt.TitleParams(f"{what} per head, mean over {corpus.n_analysed} texts · {corpus.model['id']}",
                            anchor="start", subtitle=[subtitle])
    tooltip = [alt.Tooltip("label:N", title="Head"), alt.Tooltip("value:Q", title=f"{what}, mean", format=".4f"),
               alt.Tooltip("low:Q", title=f"{level} CI low", format=".4f"),
               alt.Tooltip("high:Q", title=f"{level} CI high", format=".4f"), alt.Tooltip("n:Q", title="Texts")]
    return _atlas_chart(frame, *corpus.means[score].shape, f"{LEGEND_TITLES.get(score, what)}, mean", title, tooltip,
                        atlas_scale(score, corpus.means[score]))


def selected_head(selection, name: str = ATLAS_SELECTION) -> tuple[int, int] | None:
    """(layer, head) of the atlas cell a Streamlit selection event holds, or None when nothing is selected.

    `selection` is the event's "selection" mapping ({param name: [{"layer": L, "head": H}, ...]} for a point
    selection); the last point wins when several were shift-clicked.
    """
    points = (selection or {}).get(name) or []
    if isinstance(points, dict):  # an empty selection state is {} before any click
        points = [points] if "layer" in points else []
    for point in reversed(list(points)):
        try:
            return int(point["layer"]), int(point["head"])
        except (KeyError, TypeError, ValueError):
            continue
    return None


# --- issue 15: ablation atlas, neuron view, two models side by side (duck-typed: no analysis import here) ---

NEURON_BARS = 256  # a head has at most this many dimensions drawn per bar chart (d_head is 64-256 in practice)


def _grid_chart(values: np.ndarray, title: alt.TitleParams, value_title: str, diverging: bool,
                fmt: str = ".4f", domain: list[float] | None = None) -> alt.LayerChart:
    """A layers x heads grid of one number (grey where undefined); diverging colours centred on 0 for changes.

    `domain` fixes the colour scale, so that two models' atlases read on one scale."""
    values = np.asarray(values, dtype=np.float64)  # [layer, head]
    n_layers, n_heads = values.shape
    layers, heads = np.indices(values.shape)  # [layer, head] each
    frame = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel(),
                          "value": [float(f"{v:.6g}") if math.isfinite(v) else None for v in values.ravel()]})
    x = alt.X("head:O", title="Head", axis=alt.Axis(labelAngle=0), scale=alt.Scale(domain=list(range(n_heads))))
    y = alt.Y("layer:O", title="Layer", scale=alt.Scale(domain=list(range(n_layers))))
    tooltip = [alt.Tooltip("label:N", title="head"), alt.Tooltip("value:Q", title=value_title, format=fmt)]
    base = alt.Chart(frame).transform_calculate(label="'L' + datum.layer + 'H' + datum.head")  # L{layer}H{head}
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    if diverging:  # red: the number went up, blue: down, white: no change
        scale = alt.Scale(scheme="redblue", reverse=True, domain=[-bound, bound])
    else:
        scale = alt.Scale(scheme="viridis", **({} if domain is None else {"domain": domain}))
    cells = base.mark_rect(color="#e6e6e6").encode(x=x, y=y, tooltip=tooltip)
    defined = base.transform_filter("isValid(datum.value)").mark_rect().encode(
        x=x, y=y, tooltip=tooltip, color=alt.Color("value:Q", title=value_title, scale=scale))
    size = int(min(max(22 * max(n_heads, n_layers), 240), 640))
    return alt.layer(cells, defined).properties(title=title, width=size, height=int(size * n_layers / max(n_heads, 1)))


def build_ablation_chart(ablation, model_id: str) -> alt.LayerChart:
    """The ablation atlas: per layer x head, the change in loss when that head's output is removed (red: worse),
    or, without an LM head, the change in the final hidden states."""
    if ablation.is_loss:
        what = "Δ loss (nats)"
        loss = f"{ablation.baseline:.4f}" if math.isfinite(ablation.baseline) else "undefined (NaN or infinite)"
        subtitle = [(f"{ablation.description}; unablated loss {loss}. Red: the model predicts "
                     "worse without the head; blue: better.")]
    else:
        what = "hidden-state change"
        subtitle = [ablation.description]
    subtitle.append(f"{len(ablation.tokens)} tokens, {ablation.n_passes} forward passes (batches of "
                    f"{ablation.batch_size})")
    title = alt.TitleParams(f"Head ablation ({ablation.mode}) · {model_id}", anchor="start", subtitle=subtitle)
    return _grid_chart(ablation.delta, title, what, diverging=ablation.is_loss)


def _token_label(tokens, position: int) -> str:
    return f"{position}: {display_token(tokens[position])}"


def build_neuron_products_chart(view) -> alt.Chart:
    """q_i * k_i for each dimension of the head, sorted by magnitude: the bars sum to the unscaled dot product."""
    order = view.order[:NEURON_BARS]  # [dims shown] by decreasing |q_i k_i|
    signs = np.where(view.products[order] >= 0, "+", "−")  # [dims shown]
    frame = pd.DataFrame({"dimension": order, "rank": np.arange(order.size), "product": view.products[order],
                          "q": view.q[order], "k": view.k[order], "sign": signs})
    shown = "" if order.size == view.products.size else f" (the {order.size} largest of {view.products.size})"
    title = alt.TitleParams(
        f"q·k by dimension · L{view.layer}H{view.head} · query {_token_label(view.tokens, view.query_pos)} → key "
        f"{_token_label(view.tokens, view.key_pos)}", anchor="start",
        subtitle=[(f"Each bar is q_i × k_i{shown}, sorted by magnitude; together they sum to the unscaled dot "
                   f"product {view.dot:.4f}.")])
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("dimension:O", sort=alt.SortField("rank"), title="Dimension (sorted by |q_i k_i|)",
                axis=alt.Axis(labelAngle=0, labelOverlap=True)),
        y=alt.Y("product:Q", title="q_i × k_i"),
        color=alt.Color("sign:N", title="sign", scale=alt.Scale(domain=["+", "−"], range=[COLORS["same"],
                                                                                        COLORS["diff"]])),
        tooltip=[alt.Tooltip("dimension:O"), alt.Tooltip("product:Q", format=".4f"), alt.Tooltip("q:Q", format=".4f"),
                 alt.Tooltip("k:Q", format=".4f")],
    ).properties(title=title, width=WIDTH, height=HEIGHT)


def build_neuron_vectors_chart(view) -> alt.Chart:
    """The query and key vectors, dimension by dimension."""
    d = view.q.size
    frame = pd.DataFrame({"dimension": np.tile(np.arange(d), 2), "value": np.concatenate([view.q, view.k]),
                          "vector": ["Q"] * d + ["K"] * d})
    title = alt.TitleParams(f"Query and key vectors · L{view.layer}H{view.head} (key head {view.kv_head})",
                            anchor="start", subtitle=[(f"Q at {_token_label(view.tokens, view.query_pos)}, K at "
                                                       f"{_token_label(view.tokens, view.key_pos)}")])
    return alt.Chart(frame).mark_bar(opacity=0.75).encode(
        x=alt.X("dimension:O", title="Dimension", axis=alt.Axis(labelOverlap=True, labelAngle=0)),
        xOffset="vector:N",
        y=alt.Y("value:Q", title="Activation"),
        color=alt.Color("vector:N", scale=alt.Scale(domain=["Q", "K"], range=[COLORS["Q"], COLORS["K"]])),
        tooltip=["vector:N", "dimension:O", alt.Tooltip("value:Q", format=".4f")],
    ).properties(title=title, width=WIDTH, height=HEIGHT // 2)


def build_neuron_keys_chart(view) -> alt.VConcatChart:
    """For every key: the query's unscaled dot product with it and the softmax weight the head gave it."""
    n = view.dots.size
    frame = pd.DataFrame({"position": np.arange(n), "token": [display_token(t) for t in view.tokens[:n]],
                          "dot": view.dots, "weight": view.weights, "selected": np.arange(n) == view.key_pos})
    x = alt.X("position:O", title="Key position", axis=alt.Axis(labelOverlap=True, labelAngle=0))
    color = alt.ColorValue(**alt.condition("datum.selected", alt.value(COLORS["first"]), alt.value("#9aa4ad")))
    tooltip = ["position:O", "token:N", alt.Tooltip("dot:Q", format=".4f"), alt.Tooltip("weight:Q", format=".4f")]
    base = alt.Chart(frame).properties(width=WIDTH, height=HEIGHT // 2)
    dots = base.mark_bar().encode(x=x, y=alt.Y("dot:Q", title="q·k (unscaled)"), color=color, tooltip=tooltip)
    weights = base.mark_bar().encode(x=x, y=alt.Y("weight:Q", title="softmax weight"), color=color, tooltip=tooltip)
    query = _token_label(view.tokens, view.query_pos)
    title = alt.TitleParams(f"Every key of query {query} · L{view.layer}H{view.head}",
                            anchor="start", subtitle=[("Top: the dot product; bottom: the head's softmax weight "
                                                       "(0 where masked). The selected key is blue.")])
    return alt.vconcat(dots, weights).properties(title=title)


def build_compare_atlas_chart(compare, score: str, which: str) -> alt.LayerChart:
    """One head score per layer x head for model A, model B, or their difference B - A (diverging colours)."""
    if which == "difference":
        values = compare.score_difference[score]
        model = f"{compare.b.model['id']} − {compare.a.model['id']}"
    else:
        result = compare.a if which == "a" else compare.b
        values, model = result.head_scores[score], result.model["id"]
    what = SCORE_TITLES.get(score, score)
    subtitle = ["B − A: red where B's score is higher, blue where lower; grey: undefined."
                if which == "difference" else "Every layer x head, one colour scale for both models; grey: undefined."]
    title = alt.TitleParams(f"{what}{' difference' if which == 'difference' else ''} · {model}", anchor="start",
                            subtitle=subtitle)
    both = np.concatenate([np.ravel(compare.a.head_scores.get(score, [])),
                           np.ravel(compare.b.head_scores.get(score, []))])  # [2 * layer * head]
    both = both[np.isfinite(both)]
    domain = [float(both.min()), float(both.max())] if both.size and both.max() > both.min() else None
    return _grid_chart(values, title, f"Δ {score}" if which == "difference" else score,
                       diverging=which == "difference", domain=domain)


def build_compare_ablation_chart(compare) -> alt.LayerChart:
    """B - A of the two ablation atlases (red: removing the head costs B more)."""
    a = compare.ablation_a
    title = alt.TitleParams(f"Head ablation ({a.mode}) difference · {compare.b.model['id']} − {compare.a.model['id']}",
                            anchor="start", subtitle=[f"B − A of: {a.description}"])
    return _grid_chart(compare.ablation_difference, title, "Δ of Δ", diverging=True)


def build_compare_qk_chart(compare, layer: int, stat: str = "q_stds") -> alt.Chart:
    """The notebook's per-head Q/K statistic of one layer for both models, side by side."""
    rows = [row for row in compare.qk_rows() if row["layer"] == layer]
    names = {"a": compare.a.model["id"], "b": compare.b.model["id"]}
    if names["a"] == names["b"]:
        names = {"a": f"A: {names['a']}", "b": f"B: {names['b']}"}
    frame = pd.DataFrame([{"head": row["head"], "label": row["label"], "model": names[side],
                           "value": row[f"{stat}_{side}"]} for row in rows for side in ("a", "b")])
    what = SCORE_TITLES.get(stat.rstrip("s"), stat)
    title = alt.TitleParams(f"{what} · layer {layer} · both models", anchor="start",
                            subtitle=["Per query head; K values are the key head that query head reads."])
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("head:O", title="Head", axis=alt.Axis(labelAngle=0)), xOffset="model:N",
        y=alt.Y("value:Q", title=what), color=alt.Color("model:N", title="model"),
        tooltip=["label:N", "model:N", alt.Tooltip("value:Q", format=".4f")],
    ).properties(title=title, width=WIDTH, height=HEIGHT // 2)
