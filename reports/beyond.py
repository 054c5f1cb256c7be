"""Report sections beyond observation (issue 15): the ablation atlas, the neuron view, and two models compared.

`build_beyond_context` turns the analysis objects into plain values and chart specs for
templates/partials/beyond.html; `render_report_with` renders the ordinary report with that section added.
"""

from __future__ import annotations

import math
import shlex

from reports.charts import (
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_ablation_chart,
    build_compare_ablation_chart,
    build_compare_atlas_chart,
    build_compare_qk_chart,
    build_neuron_keys_chart,
    build_neuron_products_chart,
    build_neuron_vectors_chart,
    display_token,
)
from reports.html import ENV, _chart_context, build_report_context, select_layers
from reports.provenance import TEXT_FILE, insert_before_outputs, model_options

BEYOND_ID = "headscope-beyond"
QK_STATS = ("q_means", "q_stds", "k_means", "k_stds")


def _grid(values) -> list[dict]:
    """[layer, head] as table rows {"layer", "cells": [float or None]}."""
    return [{"layer": layer, "cells": [float(v) if math.isfinite(v) else None for v in row]}
            for layer, row in enumerate(values)]


def _ablation_context(ablation, model_id: str, chart_id: str = "chart-ablation") -> dict:
    baseline = ablation.baseline
    return {"description": ablation.description, "mode": ablation.mode, "measure": ablation.measure,
            "baseline": baseline if baseline is None or math.isfinite(baseline) else None,
            "undefined_loss": ablation.is_loss and not math.isfinite(baseline),  # NaN or inf: float16 overflow
            "n_passes": ablation.n_passes, "batch_size": ablation.batch_size, "seed": ablation.seed,
            "masked": [{"position": p, "text": display_token(ablation.tokens[p])} for p in ablation.masked_positions],
            "rows": _grid(ablation.delta), "n_heads": ablation.delta.shape[1],
            **_chart_context(build_ablation_chart(ablation, model_id), chart_id)}


def _neuron_context(view) -> dict:
    charts = [("products", build_neuron_products_chart(view)), ("vectors", build_neuron_vectors_chart(view)),
              ("keys", build_neuron_keys_chart(view))]
    return {"layer": view.layer, "head": view.head, "kv_head": view.kv_head, "dot": view.dot,
            "sum": float(view.products.sum()),
            "query": {"position": view.query_pos, "text": display_token(view.tokens[view.query_pos])},
            "key": {"position": view.key_pos, "text": display_token(view.tokens[view.key_pos])},
            "key_rows": [{"position": i, "text": display_token(view.tokens[i]), "dot": float(view.dots[i]),
                      "weight": float(view.weights[i]), "selected": i == view.key_pos} for i in range(view.dots.size)],
            "charts": [_chart_context(chart, f"chart-neuron-{name}") for name, chart in charts]}


def _compare_context(compare) -> dict:
    scores = []
    for score in compare.a.head_scores:
        charts = [_chart_context(build_compare_atlas_chart(compare, score, which), f"chart-compare-{score}-{which}")
                  for which in ("a", "b") if score in compare.b.head_scores]
        if score in compare.score_difference:
            charts.append(_chart_context(build_compare_atlas_chart(compare, score, "difference"),
                                         f"chart-compare-{score}-difference"))
        scores.append({"score": score, "title": SCORE_TITLES.get(score, score),
                       "explanation": SCORE_EXPLANATIONS.get(score, ""), "charts": charts,
                       "difference": _grid(compare.score_difference[score])
                       if score in compare.score_difference else None})
    layers = sorted(set(compare.a.layers) & set(compare.b.layers))
    qk_charts = [_chart_context(build_compare_qk_chart(compare, layer, stat), f"chart-compare-L{layer}-{stat}")
                 for layer in layers for stat in QK_STATS]
    ablation = None
    if compare.ablation_a is not None:
        ablation = {"a": _ablation_context(compare.ablation_a, compare.a.model["id"], "chart-compare-ablation-a"),
                    "b": _ablation_context(compare.ablation_b, compare.b.model["id"], "chart-compare-ablation-b"),
                    "difference": None}
        if compare.ablation_difference is not None:
            ablation["difference"] = _chart_context(build_compare_ablation_chart(compare),
                                                    "chart-compare-ablation-difference")
    return {"a": compare.a.model, "b": compare.b.model, "warnings": list(compare.warnings), "scores": scores,
            "qk_rows": compare.qk_rows(), "qk_charts": qk_charts, "ablation": ablation}


def build_beyond_context(result, ablation=None, neuron=None, compare=None) -> dict:
    """The section's plain values: each part None when not computed; `data` is embedded as JSON."""
    data = {}
    if ablation is not None:
        data["ablation"] = ablation.to_dict()
    if neuron is not None:
        data["neuron"] = neuron.to_dict()
    if compare is not None:
        data["compare"] = compare.to_dict()
    return {
        "ablation": None if ablation is None else _ablation_context(ablation, result.model["id"]),
        "neuron": None if neuron is None else _neuron_context(neuron),
        "compare": None if compare is None else _compare_context(compare),
        "data": data,
        "data_id": BEYOND_ID,
    }


def document_with(results: dict, sections: dict) -> dict:
    """The JSON document of `results` (a headscope.results/1 document; its provenance left out) with the sections'
    JSON ({"ablation", "neuron", "compare"}, each absent or None when not computed): with a comparison, its
    headscope.compare/1 document (whose "ablation" holds both models' atlases), else the results with "ablation"
    added; "neuron" is added to either. What --json writes and --from-report reads back out of a report."""
    if sections.get("compare") is not None:
        doc = dict(sections["compare"])
    else:
        doc = {key: value for key, value in results.items() if key != "provenance"}
        if sections.get("ablation") is not None:
            doc["ablation"] = sections["ablation"]
    if sections.get("neuron") is not None:
        doc["neuron"] = sections["neuron"]
    return doc


def _with_layers(argv: list[str], layers: list[str]) -> list[str]:
    """argv with its --layer flags (and --all-layers) replaced by `layers` (["--all-layers"], or layer numbers),
    put before --head."""
    rest = [arg for i, arg in enumerate(argv) if arg not in ("--layer", "--all-layers")
            and (i == 0 or argv[i - 1] != "--layer")]
    at = rest.index("--head") if "--head" in rest else len(rest)
    chosen = layers if layers == ["--all-layers"] else [token for layer in layers for token in ("--layer", layer)]
    return rest[:at] + chosen + rest[at:]


def reproduce_with(command: str, ablation=None, neuron=None, compare=None) -> str:
    """The report's recompute command with the flags of the sections it holds (before its --html)."""
    argv = shlex.split(command)
    given = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--layer"]
    measured = [str(layer) for layer in sorted(compare.a.layers)] if compare is not None else given
    if compare is not None and sorted(compare.a.layers) != sorted(compare.b.layers):
        # each model's every layer (--all-layers, models of two depths): the command lists A's layers, which would
        # leave B's deeper ones out
        argv = _with_layers(argv, ["--all-layers"])
    elif set(given) != set(measured):  # the layers the comparison measured: one they share, not A's default
        argv = _with_layers(argv, measured)
    if neuron is not None and "--all-layers" not in argv:  # the neuron view is drawn on the first --layer given
        # (with --all-layers on the default layer, which the command's --all-layers gives it again)
        layers = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--layer"]
        argv = _with_layers(argv, [str(neuron.layer)] + [layer for layer in layers if layer != str(neuron.layer)])
    extra = []
    if ablation is not None:
        extra += ["--ablation", ablation.mode, "--mask-seed", str(ablation.seed), "--ablation-batch",
                  str(ablation.batch_size)]
    if neuron is not None:
        extra += ["--neuron", str(neuron.query_pos), str(neuron.key_pos)]
    if compare is not None:
        extra += model_options("--compare", "--compare-revision", compare.b.model)  # a local B: its absolute path
    return insert_before_outputs(argv, extra)


def render_report_with(result, layers=None, head: int = 0, ablation=None, neuron=None, compare=None,
                       generated_at=None, text_file: str | None = TEXT_FILE) -> str:
    """The standalone report of `result` with the ablation / neuron / comparison sections that were computed."""
    context = build_report_context(select_layers(result, layers), head, generated_at, text_file)
    context["beyond"] = build_beyond_context(result, ablation, neuron, compare)
    provenance = context["provenance"]
    provenance["command"] = reproduce_with(provenance["command"], ablation, neuron, compare)
    return ENV.get_template("report.html").render(context)
