"""Standalone HTML reports: one Jinja2 Environment, a pure context builder, one render call.

A report opens offline years later: the Vega/Vega-Lite/Vega-Embed bundle is inlined once, every chart
spec and the results JSON travel in inert <script type="application/json"> blocks (through |tojson),
and a Content-Security-Policy admits only the two inline scripts, by hash, and nothing from outside.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from analysis import __version__
from analysis.errors import HeadscopeError
from analysis.heads import key_head_of
from analysis.parity import PARITY_FAILED, describe_tolerance, describe_tolerances, result_parity_failures
from analysis.results import OLD_SCORE_DEFINITION, OLD_SCORES_NOTE, SCHEMA, AnalysisResult, with_score_definition
from analysis.schema import parse_json, validate_beyond, validate_results
from reports.charts import (
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_atlas_chart,
    build_corpus_atlas_chart,
    build_layer_charts,
    display_token,
    keys_description,
    query_name,
    readout_description,
)
from reports.provenance import (  # noqa: F401 (LIBRARIES, reproduce_command: kept importable from here)
    LIBRARIES,
    TEXT_FILE,
    build_provenance,
    git_commit,
    library_versions,
    reproduce_command,
    with_probe_command,
)
from reports.untrusted import html_literal, needs_text_file, shown_command, visible

ROOT = Path(__file__).resolve().parents[1]
# templates/ at the checkout's top level; an installed package carries them as reports/templates (pyproject.toml)
TEMPLATES = next((d for d in (ROOT / "templates", Path(__file__).resolve().parent / "templates") if d.is_dir()),
                 ROOT / "templates")
RESULTS_ID = "headscope-results"
CORPUS_ID = "headscope-corpus"
VEGA_LITE_VERSION = "6.4"
CANVAS_ROWS = 1000  # charts with more data rows than this draw on canvas (faster to draw), not SVG
# Altair's JSON-schema check of each spec as it is made: about a seventh of a report's rendering (a batch archives
# thousands) for the same page; the tests run it on every page they render (tests/conftest.py)
VALIDATE_SPECS = False
DATA_ID = "headscope-datasets"
PROBE_ID = "headscope-probe-results"  # the induction probe's results, when the report carries its atlases
ASSETS_DIR = "assets"
VIA_CHARS = 200  # label columns shorter than this (as JSON) are not worth looking up through another column
FRAGMENT_CHARS = 60  # parts of chart specs at least this long (as JSON) that two specs share are stored once
EMBED_SCRIPT = """\
(() => {
  // One copy of the data: every chart's named datasets are rebuilt here from the results JSON (columns taken from
  // its arrays by index) and one block of encoded columns; the chart specs carry no data of their own.
  const json = (id) => JSON.parse(document.getElementById(id).textContent);
  const pool = json("headscope-datasets"), results = json(pool.results);
  const sources = pool.sources.map((path) => path.reduce((node, key) => node[key], results).flat(Infinity));
  const digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
  const indexes = (enc) => {
    if (enc.list) return enc.list;
    if (enc.period) return Array(enc.times).fill(indexes(enc.period)).flat();
    if (enc.each) return indexes(enc.of).flatMap((value) => Array(enc.each).fill(value));
    const out = [];
    let value = 0;
    if (enc.steps) for (const step of enc.steps) out.push(value += step);
    else if (enc.chars !== undefined) {
      for (const [, number, char] of enc.chars.matchAll(/\\((-?\\d+)\\)|(.)/g)) {
        out.push(value += number ? +number : digits.indexOf(char));
      }
    }
    else {
      const runs = enc.runs;
      for (let j = 0; j < runs.length; j += 2) for (let c = 0; c < runs[j + 1]; c++) out.push(value += runs[j]);
    }
    return out;
  };
  const column = (enc) => {
    if (enc.values) return enc.values;
    if (enc.ints) return indexes(enc.ints);
    const at = indexes(enc.at), from = enc.levels || enc.sources.flatMap((source) => sources[source]);
    return at.map((i) => from[i]);
  };
  const unshare = (node) => {
    if (Array.isArray(node)) return node.map(unshare);
    if (node === null || typeof node !== "object") return node;
    if ("$fragment" in node) return unshare(pool.fragments[node.$fragment]);
    return Object.fromEntries(Object.entries(node).map(([key, value]) => [key, unshare(value)]));
  };
  const looked = (enc, data) => {
    const table = indexes(enc.table);
    return indexes(data.columns[enc.via].at).map((i) => enc.levels[table[Math.floor(i / enc.div) % enc.mod]]);
  };
  const columns = {};
  const rows = (name) => {
    const data = pool.datasets[name];
    columns[name] = columns[name] || Object.entries(data.columns).map(
      ([key, enc]) => [key, enc.via ? looked(enc, data) : column(enc)]);
    const pairs = columns[name];
    const row = (i) => Object.fromEntries(pairs.map(([key, values]) => [key, values[i]]));
    return Array.from({length: data.rows}, (_, i) => row(i));
  };
  // ast: vega-embed then evaluates expressions with its bundled interpreter, never eval(): CSP-safe
  const draw = (el) => {
    if (el.dataset.drawn) return Promise.resolve();
    el.dataset.drawn = "1";
    if (typeof vegaEmbed === "undefined") {  // a --shared-assets page away from its folder: no bundle was loaded
      const bundle = document.querySelector("script[src]");
      el.textContent = "This chart could not be drawn: its script " + (bundle ? bundle.getAttribute("src") : "")
        + " is missing beside this page (pages written with --shared-assets need their folder: move it whole).";
      return Promise.resolve();
    }
    const spec = unshare(json(el.dataset.chart));
    const names = (el.dataset.datasets || "").split(" ").filter(Boolean);  // none: the spec carries its data
    if (names.length) spec.datasets = Object.fromEntries(names.map((name) => [name, rows(name)]));
    const options = {actions: false, renderer: el.dataset.renderer, ast: true};
    return vegaEmbed(el, spec, options).then((embedded) => { el.view = embedded.view; })
      .catch((error) => { el.textContent = "This chart could not be drawn: " + error; });
  };
  // Charts on screen first; the rest one at a time after them, so the page answers while they draw.
  const charts = [...document.querySelectorAll("[data-chart]")];
  if ("IntersectionObserver" in window) {  // without it, the loop below still draws every chart, in page order
    const seen = new IntersectionObserver((entries) => {
      for (const entry of entries) if (entry.isIntersecting) { seen.unobserve(entry.target); draw(entry.target); }
    }, {rootMargin: "200px"});
    charts.forEach((el) => seen.observe(el));
  }
  let next = 0;
  const rest = () => {
    while (next < charts.length && charts[next].dataset.drawn) next++;
    if (next < charts.length) draw(charts[next]).then(() => setTimeout(rest, 0));
  };
  setTimeout(rest, 0);
  // Printing (chromium --print-to-pdf at the load event, Ctrl+P right after opening) would keep the boxes not yet
  // drawn blank: draw them all now. Vega draws inline data within this task, before the page is laid out to print.
  window.addEventListener("beforeprint", () => charts.forEach(draw));
})();
"""
NOT_A_REPORT = "{path} holds no headscope results (no <script id=\"headscope-results\">): is it a headscope report?"
# headscope's first reports (2026-11-28, before a0c2e3e) embedded headscope.results/1 without head scores
TITLE_MODEL_CHARS = 40  # of a model id at the end of a report chart's title (_short_title)
CORPUS_PAGE = ("{path} is a corpus report (means over many texts), which --from-report does not read: it reads one "
               "text's report (the --batch folder's report-NNNN.html), and --from-results DIR --json OUT gives a "
               "results folder's means as JSON.")
FIRST_SETTINGS = {"exclude_first_token"}  # all the settings those reports recorded (later ones record more)
BEFORE_HEAD_SCORES = ("{path} was written before headscope computed head scores (its results JSON has none, which "
                      "this headscope's require): read it with the headscope that wrote it, whose git commit the page "
                      "names under 'What produced this report'.")

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
ENV.filters["command"] = shown_command  # a reproduce command: seen as it runs, and runs as seen when copied


@functools.cache
def vega_bundle() -> str:
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


@functools.cache
def content_security_policy(shared_assets: bool = False) -> str:
    """Inline scripts by hash only. With shared assets the Vega bundle is a file beside the page, admitted as
    'self': a hash cannot admit it (Subresource Integrity needs CORS, which a file:// page does not have)."""
    embed = _csp_hash(EMBED_SCRIPT)
    scripts = f"'self' {embed}" if shared_assets else f"{_csp_hash(vega_bundle())} {embed}"
    return (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data: blob:; "
            "font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")


def shared_assets_name() -> str:
    """The bundle's file name under assets/: named by its hash, so a page never runs a bundle it was not made with."""
    return f"{ASSETS_DIR}/vega-{hashlib.sha256(vega_bundle().encode()).hexdigest()[:16]}.js"


def write_shared_assets(out_dir: Path) -> str:
    """Writes the Vega bundle once into out_dir/assets/ and returns its path relative to out_dir (for the pages)."""
    name = shared_assets_name()
    try:
        (out_dir / ASSETS_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(vega_bundle(), encoding="utf-8")
    except OSError as exc:
        raise HeadscopeError(f"Cannot write {out_dir / name}: {exc.strerror}.") from None
    return name


def _script_context(assets: str | None) -> dict:
    """The page's scripts: the Vega bundle inline (standalone) or from `assets` (a shared file), and the loop."""
    return {
        "csp": content_security_policy(assets is not None),
        "vega_bundle": Markup(vega_bundle()) if assets is None else None,  # trusted: built by vl-convert
        "vega_src": assets,
        "embed_script": Markup(EMBED_SCRIPT),
    }


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


def _atlas_context(result: AnalysisResult, pool: DataPool) -> list[dict]:
    """One atlas per head score: its chart, its one-sentence explanation and the same numbers as a table."""
    return [{"score": score, "title": SCORE_TITLES.get(score, score), "explanation": SCORE_EXPLANATIONS.get(score, ""),
             "rows": _score_grid(values), "n_heads": values.shape[1] if values.ndim == 2 else 0,
             **_chart_context(build_atlas_chart(result, score), f"chart-atlas-{score}", pool)}
            for score, values in result.head_scores.items()]


def old_scores_note(result) -> str | None:
    """The page's line for duplicate-token and induction scores of the earlier copies' definition (an encoder's
    results written before 2026-12-07), else None."""
    return OLD_SCORES_NOTE if result.score_definition == OLD_SCORE_DEFINITION else None


def build_probe_context(probe: AnalysisResult) -> dict:
    """The induction probe run beside the text: its length, seed and command, one atlas per head score (with the
    same numbers as tables) and its results, embedded as JSON under PROBE_ID."""
    if not probe.induction_probe:
        raise ValueError("build_probe_context takes the results of the induction probe (analyze_induction_probe).")
    atlas = [{"score": score, "title": SCORE_TITLES.get(score, score),
              "explanation": SCORE_EXPLANATIONS.get(score, ""), "rows": _score_grid(values),
              "n_heads": values.shape[1] if values.ndim == 2 else 0,
              **_chart_context(build_atlas_chart(probe, score), f"chart-probe-atlas-{score}")}
             for score, values in probe.head_scores.items()]
    return {"length": probe.induction_probe["length"], "seed": probe.induction_probe["seed"],
            "n_tokens": probe.n_tokens, "model": probe.model, "exclude_first_token": probe.exclude_first_token,
            "old_scores": old_scores_note(probe),
            "command": reproduce_command(probe, outputs=("--html", "probe.html")), "atlas": atlas,
            "results": probe.to_dict(), "results_id": PROBE_ID}


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


def _nine(value):
    return float(f"{value:.9g}")


def _short(values: list[float]) -> list[float]:
    """Values at float32 precision, each in its shortest form (at most 9 significant digits)."""
    array = np.asarray(values, dtype=np.float64)  # [row]
    fits = (np.abs(array) < 3e38) & ((np.abs(array) > 1e-37) | (array == 0))  # float32's normal range
    return [float(np.format_float_positional(np.float32(v), unique=True, trim="-")) if ok else _nine(v)
            for v, ok in zip(array.tolist(), fits.tolist())]


def _encode_indexes(values) -> dict:
    """Ints as the shortest of: the list, its steps (differences), runs of equal steps, or a repeated period."""
    values = np.asarray(values, dtype=np.int64)  # [row]
    steps = np.diff(values, prepend=0)  # [row]
    starts = np.flatnonzero(np.diff(steps, prepend=steps[:1] - 1)) if steps.size else steps  # [run]
    counts = np.diff(np.append(starts, steps.size))  # [run]
    runs = np.stack([steps[starts], counts], axis=1).ravel()  # [run * 2]: step, count
    options = [{"list": values.tolist()}, {"steps": steps.tolist()}, {"runs": runs.tolist()},
               {"chars": _step_chars(steps)}]
    period = _period(values)
    if period:
        options.append({"period": _encode_indexes(values[:period]), "times": values.size // period})
    each = _each(values)
    if each > 1:
        options.append({"each": each, "of": _encode_indexes(values[::each])})
    return min(options, key=lambda option: len(json.dumps(option)))


STEP_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # steps 0..61, one character each


def _step_chars(steps: np.ndarray) -> str:
    """Steps as text: one character for a step of 0..61, "(step)" for any other."""
    return "".join(STEP_CHARS[step] if 0 <= step < len(STEP_CHARS) else f"({step})" for step in steps.tolist())


def _period(values: np.ndarray) -> int:
    """The shortest p < len(values) such that values is values[:p] repeated (0 when there is none)."""
    n = values.size
    for p in _divisors(n)[:-1]:
        if values[p] == values[0] and np.array_equal(values[p:], values[:-p]):
            return p
    return 0


def _each(values: np.ndarray) -> int:
    """The largest k > 1 such that values is values[::k] with every entry repeated k times (1 when none)."""
    for k in reversed(_divisors(values.size)[1:-1]):
        if values[k - 1] == values[0] and np.array_equal(np.repeat(values[::k], k), values):
            return k
    return 1


@functools.cache
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class DataPool:
    """The charts' datasets of one page, each stored once by name, as columns that point into the results JSON.

    A float column whose every value (at 9 significant digits) is in one of the results' arrays becomes indexes
    into that array; a text column becomes levels and codes; the rest is written as it is (floats at 9 digits).
    The page's script rebuilds the rows (EMBED_SCRIPT); `rows()` does the same here, for the tests.
    """

    MIN_SOURCE = 8  # arrays shorter than this are not worth an index

    def __init__(self, results: dict, results_id: str):
        self.results, self.results_id = results, results_id
        self.paths = [path for path, values in _number_arrays(results) if len(values) >= self.MIN_SOURCE]
        self._values = [_flat_at(results, path) for path in self.paths]
        self._lookups: dict[int, tuple] = {}
        self.datasets: dict[str, dict] = {}
        self.fragments: list = []
        self._fragment_of: dict[str, int] = {}

    def add(self, spec: dict) -> list[str]:
        """Moves the spec's datasets into the pool (the spec keeps only their names); returns the names."""
        datasets = spec.pop("datasets", {})
        for name, rows in datasets.items():
            if name not in self.datasets:  # Altair names a dataset by the hash of its rows
                self.datasets[name] = self._encode(rows)
        return sorted(datasets)

    def _sorted(self, source: int) -> tuple[np.ndarray, np.ndarray]:
        """The distinct values of a results array, sorted, and where each first occurs (None counts as NaN)."""
        if source not in self._lookups:
            values = np.array([np.nan if v is None else v for v in self._values[source]], dtype=np.float64)  # [n]
            self._lookups[source] = np.unique(values, return_index=True)  # ([distinct], [distinct])
        return self._lookups[source]

    def _find(self, source: int, wanted: np.ndarray) -> np.ndarray:
        """For each wanted value, its first index in the array, or -1 where the array does not hold it."""
        distinct, first = self._sorted(source)
        if not distinct.size:
            return np.full(wanted.size, -1)
        at = np.searchsorted(distinct, wanted).clip(0, distinct.size - 1)  # [wanted]
        return np.where(distinct[at] == wanted, first[at], -1)

    def _cover(self, wanted: np.ndarray, most: int = 3) -> list[int] | None:
        """At most `most` results arrays that hold every value in `wanted` (greedy), or None."""
        chosen = []
        while wanted.size and len(chosen) < most:
            hits = [int((self._find(source, wanted) >= 0).sum()) if source not in chosen else 0
                    for source in range(len(self._values))]
            if not hits or max(hits) == 0:
                return None
            source = hits.index(max(hits))
            chosen.append(source)
            wanted = wanted[self._find(source, wanted) < 0]
        return chosen if not wanted.size else None

    def _encode(self, rows: list[dict]) -> dict:
        keys = list(dict.fromkeys(key for row in rows for key in row))
        columns = {key: self._column([row.get(key) for row in rows]) for key in keys}
        for key, enc in columns.items():  # a label that follows a column's place in the results: look it up there
            if "levels" not in enc:
                continue
            for other, ref in columns.items():
                if "sources" in ref:
                    shorter = _via(enc, other, ref, sum(len(self._values[source]) for source in ref["sources"]))
                    if shorter is not None:
                        columns[key] = enc = shorter
                        break
        return {"rows": len(rows), "columns": columns}

    def _column(self, values: list) -> dict:
        if values and all(isinstance(v, str) for v in values):
            levels = list(dict.fromkeys(values))
            codes = {level: i for i, level in enumerate(levels)}
            return {"levels": levels, "at": _encode_indexes([codes[v] for v in values])}
        numbers = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numbers and all(isinstance(v, int) and v >= 0 for v in values):
            return {"ints": _encode_indexes(values)}
        if numbers and all(math.isfinite(v) for v in values):
            rounded = np.array([_nine(v) for v in values])  # [row]
            chosen = self._cover(np.unique(rounded))
            if chosen is not None:  # indexes into the chosen arrays, concatenated
                at, offset = np.full(rounded.size, -1), 0  # [row]
                for source in chosen:
                    found = self._find(source, rounded)  # [row]
                    at = np.where((at < 0) & (found >= 0), found + offset, at)
                    offset += len(self._values[source])
                return {"sources": chosen, "at": _encode_indexes(at)}
            return {"values": _short(values)}
        return {"values": [_nine(v) if isinstance(v, float) and math.isfinite(v) else v for v in values]}

    def share(self, specs: list[dict]) -> list[dict]:
        """The specs with every part that two of them hold alike (FRAGMENT_CHARS or longer) stored once here."""
        counts: dict[str, int] = {}

        def count(node):
            if isinstance(node, (dict, list)):
                key = json.dumps(node, sort_keys=True)
                if len(key) >= FRAGMENT_CHARS:
                    counts[key] = counts.get(key, 0) + 1
                for child in node.values() if isinstance(node, dict) else node:
                    count(child)

        def rewrite(node):
            if not isinstance(node, (dict, list)):
                return node
            key = json.dumps(node, sort_keys=True)
            if counts.get(key, 0) > 1:
                if key not in self._fragment_of:
                    self._fragment_of[key] = len(self.fragments)
                    self.fragments.append(node)
                return {"$fragment": self._fragment_of[key]}
            if isinstance(node, dict):
                return {name: rewrite(child) for name, child in node.items()}
            return [rewrite(child) for child in node]

        for spec in specs:
            count(spec)
        return [rewrite(spec) for spec in specs]

    def spec(self, shared: dict) -> dict:
        """A spec as the page rebuilds it from `share()`'s output (the tests' view of it)."""
        if isinstance(shared, list):
            return [self.spec(child) for child in shared]
        if not isinstance(shared, dict):
            return shared
        if "$fragment" in shared:
            return self.spec(self.fragments[shared["$fragment"]])
        return {name: self.spec(child) for name, child in shared.items()}

    @classmethod
    def read(cls, results: dict, stored: dict) -> DataPool:
        """The pool of a written page: its results JSON and its datasets block (to rebuild rows, as the page does)."""
        pool = cls({}, stored["results"])
        pool.results, pool.paths = results, stored["sources"]
        pool._values = [_flat_at(results, path) for path in pool.paths]
        pool.datasets, pool.fragments = stored["datasets"], stored["fragments"]
        return pool

    def to_dict(self) -> dict:
        return {"results": self.results_id, "sources": self.paths, "fragments": self.fragments,
                "datasets": self.datasets}

    def rows(self, name: str) -> list[dict]:
        """The rows of dataset `name` as the page rebuilds them."""
        data = self.datasets[name]
        columns = {key: self._decode(enc) for key, enc in data["columns"].items() if "via" not in enc}
        for key, enc in data["columns"].items():
            if "via" in enc:
                table = _decode_indexes(enc["table"])
                place = _decode_indexes(data["columns"][enc["via"]]["at"])
                columns[key] = [enc["levels"][table[(i // enc["div"]) % enc["mod"]]] for i in place]
        return [{key: values[i] for key, values in columns.items()} for i in range(data["rows"])]

    def _decode(self, enc: dict) -> list:
        if "values" in enc:
            return enc["values"]
        if "ints" in enc:
            return _decode_indexes(enc["ints"])
        levels = enc["levels"] if "levels" in enc else [v for source in enc["sources"] for v in self._values[source]]
        return [levels[i] for i in _decode_indexes(enc["at"])]


def _via(enc: dict, other: str, ref: dict, total: int) -> dict | None:
    """`enc`'s codes as table[(place // div) % mod], `place` being where column `other` takes its values from the
    results (its indexes into arrays of `total` values), when that is shorter; None otherwise.

    Labels of thinned rows (query head, key head, key token of a dot product) are periodic in that place.
    """
    if len(json.dumps(enc["at"])) < VIA_CHARS:
        return None
    codes = np.asarray(_decode_indexes(enc["at"]), dtype=np.int64)  # [row]
    place = np.asarray(_decode_indexes(ref["at"]), dtype=np.int64)  # [row]
    best, size = None, len(json.dumps(enc))
    for div in _divisors(total)[:24]:
        for mod in _divisors(total // div):
            slot = (place // div) % mod  # [row]
            table = np.zeros(mod, dtype=np.int64)  # [mod]
            table[slot] = codes
            if np.array_equal(table[slot], codes):
                option = {"levels": enc["levels"], "via": other, "div": div, "mod": mod,
                          "table": _encode_indexes(_fill(table, slot, mod))}
                if len(json.dumps(option)) < size:
                    best, size = option, len(json.dumps(option))
                break  # a larger mod for this div is no shorter
    return best


def _fill(table: np.ndarray, used: np.ndarray, mod: int) -> np.ndarray:
    """The table with each slot no row uses copied from the slot before it, so runs and periods stay intact."""
    known = np.zeros(mod, dtype=bool)
    known[used] = True
    last = np.maximum.accumulate(np.where(known, np.arange(mod), 0))  # [mod]: the last known slot at or before
    return table[last]


def _decode_indexes(enc: dict) -> list[int]:
    if "list" in enc:
        return enc["list"]
    if "period" in enc:
        return _decode_indexes(enc["period"]) * enc["times"]
    if "chars" in enc:
        steps = [int(number) if number else STEP_CHARS.index(char)
                 for number, char in re.findall(r"\((-?\d+)\)|(.)", enc["chars"])]
        return np.cumsum(steps, dtype=np.int64).tolist()
    if "each" in enc:
        return np.repeat(_decode_indexes(enc["of"]), enc["each"]).tolist()
    if "steps" in enc:
        return np.cumsum(enc["steps"], dtype=np.int64).tolist()
    steps = [step for step, count in zip(enc["runs"][::2], enc["runs"][1::2]) for _ in range(count)]
    return np.cumsum(steps, dtype=np.int64).tolist()


def _number_arrays(node, path=()):
    """(path, flat values) of every list of numbers in a JSON document, nested lists flattened."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _number_arrays(value, (*path, key))
    elif isinstance(node, list) and node:
        flat = _flatten(node)
        if flat is not None:
            yield list(path), flat


def _flatten(node) -> list | None:
    """The numbers of a (nested) list in order, or None when it holds anything else (None counts as a number)."""
    out = []
    for item in node:
        if isinstance(item, list):
            inner = _flatten(item)
            if inner is None:
                return None
            out += inner
        elif item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)):
            out.append(item)
        else:
            return None
    return out


def _flat_at(document, path) -> list:
    for key in path:
        document = document[key]
    return _flatten(document)


def _share_specs(pool: DataPool, charts: list[dict]) -> None:
    for chart, spec in zip(charts, pool.share([chart["spec"] for chart in charts])):
        chart["spec"] = spec


def _short_title(spec: dict) -> dict:
    """The spec with a long model id at the end of its title ("... · layer 6 · MODEL") cut to its last
    TITLE_MODEL_CHARS characters: Vega draws a title on one line, so a local checkpoint's long path made the chart,
    and the page, wider than the window. The page's "What produced this report" names the whole id."""
    title = spec.get("title")
    text = title.get("text") if isinstance(title, dict) else None
    if isinstance(text, str) and " · " in text:
        head, model = text.rsplit(" · ", 1)
        if len(model) > TITLE_MODEL_CHARS:
            spec["title"] = {**title, "text": f"{head} · …{model[-(TITLE_MODEL_CHARS - 1):]}"}
    return spec


def _chart_context(chart, chart_id: str, pool: DataPool | None = None) -> dict:
    """A chart's spec for a page; with a pool its datasets move there (without one they stay in the spec)."""
    spec = _short_title(chart.to_dict(validate=VALIDATE_SPECS))
    rows = sum(len(values) for values in spec.get("datasets", {}).values())
    names = pool.add(spec) if pool is not None else []
    return {"id": chart_id, "spec": spec, "datasets": " ".join(names),
            "renderer": "canvas" if rows > CANVAS_ROWS else "svg"}


def build_report_context(result: AnalysisResult, head: int = 0, generated_at: datetime | None = None,
                         text_file: str | None = TEXT_FILE, assets: str | None = None,
                         probe: AnalysisResult | None = None,
                         outputs: tuple[str, ...] = ("--html", "report.html"), source: dict | None = None) -> dict:
    """Everything the template shows, as plain values; no rendering. `probe`: the induction probe's results on
    the same model (analyze_induction_probe), drawn as a section of their own. `outputs`: what the reproduce
    command writes; `source`: a batch text's place in its file (render_report)."""
    generated_at = generated_at or datetime.now(UTC)
    provenance = build_provenance(result, head, outputs, generated_at, text_file)  # = the JSON's
    parity_failed = result_parity_failures(result)  # {layer: error} above its tolerance (analysis.parity)
    dtype = result.model["dtype"]
    results = result.to_dict()
    pool = DataPool(results, RESULTS_ID)
    atlas = _atlas_context(result, pool)
    layers = []
    for layer in sorted(result.layers):
        charts = [
            {"title": item.title, "explanation": item.explanation,
             **_chart_context(item.chart, f"chart-L{layer}-{item.key}", pool)}
            for item in build_layer_charts(result, layer, head)
        ]
        layers.append({"index": layer, "anchor": f"layer-{layer}", "charts": charts, "heads": _head_rows(result, layer),
                       "parity": result.layers[layer].parity_max_abs_err, "parity_ok": layer not in parity_failed,
                       "parity_allowed": describe_tolerance(dtype, result.layers[layer].parity_score_max)})
    _share_specs(pool, [*atlas, *(chart for layer in layers for chart in layer["charts"])])
    special = set(result.special_positions)
    return {
        "title": f"headscope report: {result.model['id']}",
        "model": result.model,
        "text": result.text,
        # tokens as the charts label them (a leading space as ␣, a newline as ↵): a whitespace token is no blank box
        "tokens": [{"position": i, "text": display_token(token), "special": i in special}
                   for i, token in enumerate(result.tokens)],
        "first_token": display_token(result.tokens[0]) if result.tokens else "",
        "exclude_first_token": result.exclude_first_token,
        "query": {"position": result.query, "token": display_token(result.query_token), "choice": result.query_choice,
                  "name": query_name(result), "compared": keys_description(result),
                  "read_out": readout_description(result)} if result.tokens else None,
        "exclude_special_keys": result.exclude_special_keys,
        "exclude_bos": result.exclude_bos,
        "bos_excluded": bool(result.bos_excluded),
        # the parity warning is the page's own box at the top (parity_failed), shown once
        "warnings": [w for w in result.warnings if not w.startswith(PARITY_FAILED.split("{")[0])],
        "head": head,
        "layers": layers,
        "atlas": atlas,
        "induction_probe": result.induction_probe,
        "old_scores": old_scores_note(result),
        "probe": None if probe is None else build_probe_context(probe),
        "dp_rows": _dp_rows(result),
        "parity": max((layer["parity"] for layer in layers), default=0.0),
        "parity_failed": sorted(parity_failed),
        "parity_allowed": describe_tolerances(
            sorted(parity_failed), dtype, {layer: result.layers[layer].parity_score_max for layer in parity_failed}),
        "results": results,  # the provenance is shown above it, outside the (time-free) data
        "results_id": RESULTS_ID,
        "datasets": pool.to_dict(),
        "datasets_id": DATA_ID,
        "provenance": {**provenance, "libraries": tuple(provenance["libraries"].items()),
                       "command": (provenance["command"] if probe is None
                                   else with_probe_command(provenance["command"], probe)),
                       "text_file": text_file if not result.induction_probe and needs_text_file(result.text) else None,
                       "source": source},
        **_script_context(assets),
    }


def render_report(result: AnalysisResult, layers=None, head: int = 0, generated_at: datetime | None = None,
                  text_file: str | None = TEXT_FILE, assets: str | None = None,
                  probe: AnalysisResult | None = None, outputs: tuple[str, ...] = ("--html", "report.html"),
                  source: dict | None = None) -> str:
    """The standalone HTML report for `layers` of `result` (None: every layer it holds).

    `text_file`: the name its reproduce command reads the text from when the text cannot be quoted (see
    reproduce_command); whoever writes the report writes the text there (reports.__main__.write_text_beside).
    None: nothing is written beside the page (it goes to stdout), and the command carries the text itself.
    `assets`: the path, relative to the page, of a shared Vega bundle (write_shared_assets) to load instead of
    inlining it; None (the default) makes a page that needs no other file.
    `probe`: the induction probe's results (analyze_induction_probe) on the same model, added as a section with
    its own atlases, length, seed and command.
    `outputs`: the flags with which its reproduce command writes the page (a --batch archive's report-NNNN.html).
    `source`: a --batch text's place, {"input": the batch file, "number": its text's number (the report's), "line":
    the file's line it is on}, shown with the provenance.
    """
    context = build_report_context(select_layers(result, layers), head, generated_at, text_file, assets, probe,
                                   outputs, source)
    return ENV.get_template("report.html").render(context)


def render_index(entries: list[dict], model: dict, generated_at: datetime | None = None,
                 corpus_file: str | None = None, run: dict | None = None) -> str:
    """The archive page of a batch run: one row per text (entries: its "number", the report's, and "line", the
    file's), with its report link or its error. `run`: {"input": the batch file, "sha256": of its bytes, "command":
    the command line as typed} (--batch --out-dir)."""
    generated_at = generated_at or datetime.now(UTC)
    return ENV.get_template("index.html").render(
        title=f"headscope batch: {model.get('id', 'unknown model')}",
        entries=entries,
        model=model,
        corpus_file=corpus_file,
        run=run,
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


CORPUS_QUERIES = {True: "its final token, the default for causal models",
                  False: "its last token that is not a special one, the default for encoders, whose final token is "
                         "[SEP] or another special token"}


def corpus_query(corpus) -> str:
    """Which token of each text the corpus's dot products are of, in words: an encoder's default is its last word,
    not its final token ([SEP]); a chosen position is that position of every text."""
    if corpus.query_position is not None:
        return f"position {corpus.query_position} of every text, as --query-position chose"
    return CORPUS_QUERIES[bool(corpus.model.get("causal", True))]


def build_corpus_context(corpus, generated_at: datetime | None = None, assets: str | None = None) -> dict:
    """Everything the corpus report shows, as plain values; no rendering."""
    generated_at = generated_at or datetime.now(UTC)
    results = corpus.to_dict()
    pool = DataPool(results, CORPUS_ID)
    atlas = [{"score": name, "title": SCORE_TITLES.get(name, name), "explanation": SCORE_EXPLANATIONS.get(name, ""),
              "rows": _interval_grid(corpus, name), "n_heads": corpus.means[name].shape[1],
              **_chart_context(build_corpus_atlas_chart(corpus, name), f"chart-corpus-{name}", pool)}
             for name in corpus.values]
    _share_specs(pool, atlas)
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
                   "exclude_current_token": corpus.exclude_current_token, "query_position": corpus.query_position,
                   "exclude_special_keys": corpus.exclude_special_keys, "exclude_bos": corpus.exclude_bos,
                   "query": corpus_query(corpus), "old_scores": old_scores_note(corpus)},
        "failures": [{"number": r.number, "excerpt": r.excerpt, "error": r.error} for r in corpus.failures],
        "atlas": atlas,
        "layer_rows": layer_rows,
        "results": results,
        "results_id": CORPUS_ID,
        "datasets": pool.to_dict(),
        "datasets_id": DATA_ID,
        "provenance": {"headscope": __version__, "git_commit": git_commit(), "libraries": library_versions(),
                       "generated_at": generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")},
        **_script_context(assets),
    }


def _shown_run(run: dict) -> dict:
    """One run entry of a results folder's corpus.json as the corpus page lists it: a line of what ran (engine,
    batch size, Ray's workers and address, rows) and its command, if recorded and readable (a hand edit is left out,
    not a crash)."""
    def field(key):
        value = run.get(key)
        return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None

    parts = [f"{field('engine') or 'unknown'} engine"]
    if field("engine") == "ray":
        instance = {"started": "a local Ray instance started for the run",
                    "joined": f"the Ray cluster at {field('address')} ({field('gcs_address')})",
                    "already running": f"the Ray instance already running in the calling process "
                                       f"({field('gcs_address')})"}.get(field("ray_instance"))
        if instance is None:  # written before ray_instance was recorded: the address it was given
            instance = f"the Ray cluster at {field('address')}" if field("address") else "a local Ray instance"
        parts.append(f"{field('workers')} worker(s) on {instance}")
    if field("device") is not None:
        parts.append(f"device {field('device')}")
    parts.append(f"batch size {field('batch_size')}")
    summary = (f"{', '.join(parts)}; {field('started')}: {field('new_rows')} rows written, "
               f"{field('skipped')} already there")
    command = run.get("command")
    try:
        shown = command if isinstance(command, str) and shown_command(command) else None
    except ValueError:  # unbalanced quotes: not a command line
        shown = None
    return {"summary": summary, "command": shown}


def _versions_line(versions, commit) -> str:
    """`versions` ({name: version or None}, as corpus_store.versions records them) and headscope's `commit` as one line:
    "headscope 0.1.0 (git commit abc), torch 2.5.1, ..., ray not installed"; a hand-edited value is shown as text."""
    if not isinstance(versions, dict):
        return "not recorded"
    names = ["headscope", *(name for name in versions if name != "headscope")]
    parts = [f"{name} {'not installed' if versions.get(name) is None else versions[name]}" for name in names
             if name in versions]
    if parts and "headscope" in versions:
        parts[0] += f" (git commit {commit})" if isinstance(commit, str) else " (git commit not recorded)"
    return ", ".join(parts) or "not recorded"


def _computed_with(manifest: dict) -> dict:
    """Which versions computed a results folder's rows, from its corpus.json: each run's own (`versions`, `git_commit`,
    recorded since runs kept them), else the manifest's `versions`, which each run overwrote: the last run's, so
    those of earlier runs are unknown. {"line": the versions when every run that wrote rows had the same, else None;
    "runs": [{"started", "line"}] of the runs that wrote rows, shown each when they differ; "unknown": runs whose
    versions were not recorded}."""
    runs = [entry for entry in manifest["runs"] if isinstance(entry, dict)]
    writers = [entry for entry in runs if entry.get("new_rows") != 0] or runs[-1:]  # one that skipped all: none
    last = runs[-1] if runs else None
    shown, unknown = [], 0
    for entry in writers:
        if "versions" in entry:
            line = _versions_line(entry["versions"], entry.get("git_commit"))
        elif entry is last:  # the manifest's versions are the last run's
            line = _versions_line(manifest.get("versions"), None)
        else:
            line, unknown = None, unknown + 1
        started = entry.get("started")
        shown.append({"started": started if isinstance(started, str) else "", "line": line or "not recorded"})
    if not writers:  # no run entry at all: the versions of the writer that made the folder
        shown.append({"started": "", "line": _versions_line(manifest.get("versions"), None)})
    lines = {entry["line"] for entry in shown}
    return {"line": lines.pop() if len(lines) == 1 and not unknown else None, "runs": shown, "unknown": unknown}


def render_corpus_report(corpus, generated_at: datetime | None = None, assets: str | None = None,
                         run: dict | None = None, manifest: dict | None = None,
                         lines: list[int] | None = None) -> str:
    """The standalone HTML report of a corpus (analysis.corpus.CorpusResult): atlases of means with intervals.
    `run`: the batch's input and command, as render_index takes it; `manifest`: a results folder's corpus.json
    (ResultsFolder.read_manifest), whose input and runs (engine, Ray settings, command) the page lists, with the
    versions that computed its rows (_computed_with); this process's versions are then only those that drew the page.
    Without `manifest` the page is drawn by the process that computed `corpus`, and its versions are those.
    `lines`: each text's line of the input file, by text number (--batch --out-dir, whose texts are numbered as
    their reports): the failed texts' table gives both, as index.html does."""
    results = None if manifest is None else {
        "input": manifest.get("source", ""),
        "runs": [_shown_run(entry) for entry in manifest["runs"] if isinstance(entry, dict)],
        "computed": _computed_with(manifest)}
    context = build_corpus_context(corpus, generated_at, assets)
    if lines is not None:
        context["failures"] = [{**failure, "line": lines[failure["number"] - 1]} for failure in context["failures"]]
    return ENV.get_template("corpus.html").render({**context, "run": run, "results_folder": results})


MAX_REPORT_BYTES = 2 * 2**30  # --from-report reads at most this much (every layer's heatmaps at 1024 tokens: ~1 GB)


def read_report_page(path: Path) -> str:
    """A report's text, read within MAX_REPORT_BYTES; a file that is too large, unreadable or not UTF-8 is one
    HeadscopeError line."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_REPORT_BYTES + 1)  # bounded: a device such as /dev/zero never ends
        if len(data) > MAX_REPORT_BYTES:
            raise HeadscopeError(f"{path} is larger than {MAX_REPORT_BYTES / 2**30:g} GiB: is it a headscope report?")
        return data.decode("utf-8")
    except OSError as exc:
        raise HeadscopeError(f"Cannot read {path}: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise HeadscopeError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): is it a headscope report?") \
            from None


def read_report_results(path: Path) -> dict:
    """The results JSON embedded in a report, checked against its JSON Schema (the text's results only; what
    --from-report writes is read_report_document's).

    A tampered or damaged report (not UTF-8, invalid JSON, NaN, numbers past a float, a wrong schema, missing
    fields, sizes that disagree) is one HeadscopeError line.
    """
    return results_from_page(read_report_page(path), str(path))


def read_report_document(path: Path) -> dict:
    """Everything a report embeds as one JSON document, what --from-report writes (see report_document)."""
    return report_document(read_report_page(path), str(path))


def _embedded(page: str, script_id: str) -> str | None:
    """The text of the page's first <script type="application/json" id=script_id>, or None."""
    match = re.search(rf'<script type="application/json" id="{script_id}">(.*?)</script>', page, re.DOTALL)
    return None if match is None else match.group(1)


def results_from_page(page: str, name: str = "The report") -> dict:
    """The validated headscope.results/1 document in a report's text (see read_report_results)."""
    text = _embedded(page, RESULTS_ID)
    if text is None:
        raise HeadscopeError((CORPUS_PAGE if _embedded(page, CORPUS_ID) is not None else NOT_A_REPORT).format(
            path=name))
    what = f"The results JSON in {name}"
    data = parse_json(text, what)
    if (isinstance(data, dict) and data.get("schema") == SCHEMA and "head_scores" not in data
            and isinstance(data.get("settings"), dict) and set(data["settings"]) <= FIRST_SETTINGS):
        raise HeadscopeError(BEFORE_HEAD_SCORES.format(path=name))  # else a damaged one: the schema's line
    return with_score_definition(validate_results(data, what))  # an old encoder's: its scores' definition named


def with_probe_results(doc: dict, probe: AnalysisResult | dict) -> dict:
    """The results JSON with the induction probe's results (a headscope.results/1 document) under "probe", before
    its provenance: what --json writes beside --with-probe, and --from-report reads back from such a report. Given
    the probe's AnalysisResult, the provenance's command gains --with-probe too (with_probe_command), so that it
    recomputes the probe as well."""
    rest = {key: value for key, value in doc.items() if key != "provenance"}
    provenance = doc.get("provenance")
    if provenance is not None and isinstance(probe, AnalysisResult):
        provenance = {**provenance, "command": with_probe_command(provenance["command"], probe)}
    probe = probe.to_dict() if isinstance(probe, AnalysisResult) else probe
    return {**rest, "probe": probe, **({"provenance": provenance} if provenance is not None else {})}


def report_document(page: str, name: str = "The report") -> dict:
    """What a report embeds, as the --json of the run that wrote it (less the provenance, which the page shows in
    HTML): the results; with an induction probe section, its results under "probe"; with ablation / neuron /
    comparison sections, what --ablation, --neuron and --compare add to --json (reports.beyond.document_with).

    Every embedded block is checked (strict JSON, its JSON Schema, sizes that agree); a damaged or tampered one,
    or a section this version cannot read back, is one HeadscopeError line: nothing the report holds is dropped.
    """
    from reports.beyond import BEYOND_ID, document_with  # reports.beyond imports this module

    results = results_from_page(page, name)
    doc = results
    beyond = _embedded(page, BEYOND_ID)
    if beyond is not None:
        what = f"The ablation/neuron/compare JSON in {name}"
        doc = document_with(doc, validate_beyond(parse_json(beyond, what), results, what))
    probe = _embedded(page, PROBE_ID)
    if probe is not None:  # after the sections: a comparison's document replaces the results, never the probe
        what = f"The induction probe's results JSON in {name}"
        probe_doc = with_score_definition(validate_results(parse_json(probe, what), what))
        if not probe_doc["settings"].get("induction_probe"):
            raise HeadscopeError(f"{what} is not the induction probe's: its settings name no probe length and seed.")
        doc = with_probe_results(doc, probe_doc)
    return doc
