"""Standalone HTML reports: one Jinja2 Environment, a pure context builder, one render call.

A report opens offline years later: the Vega/Vega-Lite/Vega-Embed bundle is inlined once, every chart
spec and the results JSON travel in inert <script type="application/json"> blocks (through |tojson),
and a Content-Security-Policy admits only the two inline scripts, by hash, and nothing from outside.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from analysis import __version__
from analysis.errors import HeadscopeError
from analysis.metrics import key_head_of
from analysis.parity import parity_tolerance, result_parity_failures
from analysis.results import AnalysisResult
from analysis.schema import parse_json, validate_results
from reports.charts import (
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_atlas_chart,
    build_corpus_atlas_chart,
    build_layer_charts,
)
from reports.provenance import (  # noqa: F401 (LIBRARIES, reproduce_command: kept importable from here)
    LIBRARIES,
    TEXT_FILE,
    build_provenance,
    git_commit,
    library_versions,
    reproduce_command,
)
from reports.untrusted import html_literal, needs_text_file, visible

ROOT = Path(__file__).resolve().parents[1]
# templates/ at the checkout's top level; an installed package carries them as reports/templates (pyproject.toml)
TEMPLATES = next((d for d in (ROOT / "templates", Path(__file__).resolve().parent / "templates") if d.is_dir()),
                 ROOT / "templates")
RESULTS_ID = "headscope-results"
CORPUS_ID = "headscope-corpus"
VEGA_LITE_VERSION = "6.4"
CANVAS_ROWS = 4000  # charts with more data rows than this draw on canvas, not SVG
EMBED_SCRIPT = """\
for (const el of document.querySelectorAll("[data-chart]")) {
  const spec = JSON.parse(document.getElementById(el.dataset.chart).textContent);
  // ast: vega-embed then evaluates expressions with its bundled interpreter, never eval(): CSP-safe
  const options = {actions: false, renderer: el.dataset.renderer, ast: true};
  vegaEmbed(el, spec, options).catch((error) => { el.textContent = "This chart could not be drawn: " + error; });
}
"""
NOT_A_REPORT = "{path} holds no headscope results (no <script id=\"headscope-results\">): is it a headscope report?"

ENV = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENV.filters["num"] = lambda value: f"{value:.4g}" if abs(value) >= 1e-9 else "0"  # a centred mean's 2.5e-16 is 0
ENV.filters["sci"] = lambda value: f"{value:.1e}"
ENV.filters["literal"] = html_literal  # user text: control characters visible, bidirectional text isolated
ENV.filters["visible"] = visible  # the same where no markup may go (<title>)


@functools.cache
def vega_bundle() -> str:
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


@functools.cache
def content_security_policy() -> str:
    scripts = " ".join(_csp_hash(s) for s in (vega_bundle(), EMBED_SCRIPT))
    return (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data: blob:; "
            "font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")


def select_layers(result: AnalysisResult, layers=None) -> AnalysisResult:
    """The result restricted to `layers` (None: all it has), so the report embeds what it shows."""
    if layers is None:
        return result
    missing = [layer for layer in layers if layer not in result.layers]
    if missing:
        raise HeadscopeError(f"The results hold no layer {missing[0]}: analyse it first.")
    return replace(result, layers={layer: result.layers[layer] for layer in sorted(layers)})


def _head_rows(result: AnalysisResult, layer: int) -> list[dict]:
    data = result.layers[layer]
    n_heads = data.first_self.size
    groups = key_head_of(n_heads, result.model["n_kv_heads"])
    rows = []
    for head in range(n_heads):
        group = int(groups[head])
        rows.append({
            "label": f"L{layer}H{head}",
            "key_head": f"L{layer}K{group}",
            "q_mean": data.q_means[head] if data.q_means.size else None,
            "q_std": data.q_stds[head] if data.q_stds.size else None,
            "k_mean": data.k_means[group] if data.k_means.size else None,
            "k_std": data.k_stds[group] if data.k_stds.size else None,
            "first_self": data.first_self[head],
            "sink_mass": data.sink_mass[head] if data.sink_mass.size else None,
        })
    return rows


def _score_grid(values) -> list[dict]:
    """A [layer, head] array as table rows: {"layer", "cells": [value or None]} (None where undefined)."""
    return [{"layer": layer, "cells": [float(v) if math.isfinite(v) else None for v in row]}
            for layer, row in enumerate(values)]


def _atlas_context(result: AnalysisResult) -> list[dict]:
    """One atlas per head score: its chart, its one-sentence explanation and the same numbers as a table."""
    return [{"score": score, "title": SCORE_TITLES.get(score, score), "explanation": SCORE_EXPLANATIONS.get(score, ""),
             "rows": _score_grid(values), "n_heads": values.shape[1] if values.ndim == 2 else 0,
             **_chart_context(build_atlas_chart(result, score), f"chart-atlas-{score}")}
            for score, values in result.head_scores.items()]


def _mean(values) -> float | None:
    return float(values.mean()) if values.size else None


def _dp_rows(result: AnalysisResult) -> list[dict]:
    """Per layer: same-head vs different-head dot products, raw and centred (each key head's mean key removed)."""
    rows = []
    for layer in sorted(result.layers):
        data = result.layers[layer]
        stats = data.dp_stats
        if stats is None:
            continue
        rows.append({"layer": layer, "same": _mean(data.same_head_dp), "diff": _mean(data.diff_head_dp),
                     "p": stats.mannwhitney_p, "r": stats.rank_biserial,
                     "same_centered": _mean(stats.same_head_dp_centered),
                     "diff_centered": _mean(stats.diff_head_dp_centered),
                     "p_centered": stats.mannwhitney_p_centered, "r_centered": stats.rank_biserial_centered})
    return rows


def _chart_context(chart, chart_id: str) -> dict:
    spec = chart.to_dict()
    rows = sum(len(values) for values in spec.get("datasets", {}).values())
    return {"id": chart_id, "spec": spec, "renderer": "canvas" if rows > CANVAS_ROWS else "svg"}


def build_report_context(result: AnalysisResult, head: int = 0, generated_at: datetime | None = None,
                         text_file: str = TEXT_FILE) -> dict:
    """Everything the template shows, as plain values; no rendering."""
    generated_at = generated_at or datetime.now(timezone.utc)
    provenance = build_provenance(result, head, generated_at=generated_at, text_file=text_file)  # = the JSON's
    parity_failed = result_parity_failures(result)  # {layer: error} above PARITY_TOLERANCE
    layers = []
    for layer in sorted(result.layers):
        charts = [
            {"title": item.title, "explanation": item.explanation, **_chart_context(item.chart, f"chart-L{layer}-{item.key}")}
            for item in build_layer_charts(result, layer, head)
        ]
        layers.append({"index": layer, "anchor": f"layer-{layer}", "charts": charts, "heads": _head_rows(result, layer),
                       "parity": result.layers[layer].parity_max_abs_err, "parity_ok": layer not in parity_failed})
    special = set(result.special_positions)
    return {
        "title": f"headscope report: {result.model['id']}",
        "model": result.model,
        "text": result.text,
        "tokens": [{"position": i, "text": token, "special": i in special} for i, token in enumerate(result.tokens)],
        "first_token": result.tokens[0] if result.tokens else "",
        "exclude_first_token": result.exclude_first_token,
        "warnings": list(result.warnings),
        "head": head,
        "layers": layers,
        "atlas": _atlas_context(result),
        "induction_probe": result.induction_probe,
        "dp_rows": _dp_rows(result),
        "parity": max((layer["parity"] for layer in layers), default=0.0),
        "parity_failed": sorted(parity_failed),
        "parity_tolerance": parity_tolerance(result.model["dtype"]),
        "results": result.to_dict(),  # the provenance is shown above it, outside the (time-free) data
        "results_id": RESULTS_ID,
        "provenance": {**provenance, "libraries": tuple(provenance["libraries"].items()),
                       "text_file": text_file if not result.induction_probe and needs_text_file(result.text) else None},
        "csp": content_security_policy(),
        "vega_bundle": Markup(vega_bundle()),  # trusted: built by vl-convert, never user input
        "embed_script": Markup(EMBED_SCRIPT),
    }


def render_report(result: AnalysisResult, layers=None, head: int = 0, generated_at: datetime | None = None,
                  text_file: str = TEXT_FILE) -> str:
    """The standalone HTML report for `layers` of `result` (None: every layer it holds).

    `text_file`: the name its reproduce command reads the text from when the text cannot be quoted (see
    reproduce_command); whoever writes the report writes the text there (`text_file_for`).
    """
    context = build_report_context(select_layers(result, layers), head, generated_at, text_file)
    return ENV.get_template("report.html").render(context)


def render_index(entries: list[dict], model: dict, generated_at: datetime | None = None,
                 corpus_file: str | None = None) -> str:
    """The archive page of a batch run: one row per text, with its report link or its error."""
    generated_at = generated_at or datetime.now(timezone.utc)
    return ENV.get_template("index.html").render(
        title=f"headscope batch: {model.get('id', 'unknown model')}",
        entries=entries,
        model=model,
        corpus_file=corpus_file,
        generated_at=generated_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        csp="default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
    )


def _interval_grid(corpus, name: str) -> list[dict]:
    """A [layer, head] mean with its interval as table rows: {"layer", "cells": [{"mean", "low", "high"} or None]}."""
    def cell(layer: int, head: int) -> dict | None:
        mean = corpus.means[name][layer, head]
        if not math.isfinite(mean):
            return None
        return {"mean": float(mean), "low": float(corpus.low[name][layer, head]),
                "high": float(corpus.high[name][layer, head])}

    n_layers, n_heads = corpus.means[name].shape
    return [{"layer": layer, "cells": [cell(layer, head) for head in range(n_heads)]} for layer in range(n_layers)]


def build_corpus_context(corpus, generated_at: datetime | None = None) -> dict:
    """Everything the corpus report shows, as plain values; no rendering."""
    generated_at = generated_at or datetime.now(timezone.utc)
    atlas = [{"score": name, "title": SCORE_TITLES.get(name, name), "explanation": SCORE_EXPLANATIONS.get(name, ""),
              "rows": _interval_grid(corpus, name), "n_heads": corpus.means[name].shape[1],
              **_chart_context(build_corpus_atlas_chart(corpus, name), f"chart-corpus-{name}")}
             for name in corpus.values]
    layer_rows = []
    for layer in range(int(corpus.model["n_layers"])):
        row = {"layer": layer}
        for name in corpus.layer_values:
            mean = corpus.means[name][layer]
            row[name] = None if not math.isfinite(mean) else {
                "mean": float(mean), "low": float(corpus.low[name][layer]), "high": float(corpus.high[name][layer])}
        layer_rows.append(row)
    return {
        "title": f"headscope corpus: {corpus.model['id']}",
        "model": corpus.model,
        "corpus": {"n_texts": len(corpus.texts), "n_analysed": corpus.n_analysed, "n_boot": corpus.n_boot,
                   "seed": corpus.seed, "level": f"{corpus.level:.0%}",
                   "exclude_first_token": corpus.exclude_first_token,
                   "exclude_current_token": corpus.exclude_current_token},
        "failures": [{"number": r.number, "excerpt": r.excerpt, "error": r.error} for r in corpus.failures],
        "atlas": atlas,
        "layer_rows": layer_rows,
        "results": corpus.to_dict(),
        "results_id": CORPUS_ID,
        "provenance": {"headscope": __version__, "git_commit": git_commit(), "libraries": library_versions(),
                       "generated_at": generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")},
        "csp": content_security_policy(),
        "vega_bundle": Markup(vega_bundle()),  # trusted: built by vl-convert, never user input
        "embed_script": Markup(EMBED_SCRIPT),
    }


def render_corpus_report(corpus, generated_at: datetime | None = None) -> str:
    """The standalone HTML report of a corpus (analysis.corpus.CorpusResult): atlases of means with intervals."""
    return ENV.get_template("corpus.html").render(build_corpus_context(corpus, generated_at))


def read_report_results(path: Path) -> dict:
    """The results JSON embedded in a report (what --from-report reads back), checked against its JSON Schema.

    A tampered or damaged report (not UTF-8, invalid JSON, NaN, numbers past a float, a wrong schema, missing
    fields, sizes that disagree) is one HeadscopeError line.
    """
    try:
        page = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise HeadscopeError(f"Cannot read {path}: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise HeadscopeError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): is it a headscope report?") \
            from None
    return results_from_page(page, str(path))


def results_from_page(page: str, name: str = "The report") -> dict:
    """The validated headscope.results/1 document in a report's text (see read_report_results)."""
    match = re.search(rf'<script type="application/json" id="{RESULTS_ID}">(.*?)</script>', page, re.DOTALL)
    if match is None:
        raise HeadscopeError(NOT_A_REPORT.format(path=name))
    what = f"The results JSON in {name}"
    return validate_results(parse_json(match.group(1), what), what)
