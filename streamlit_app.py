"""headscope's one-page app: the notebook's attention-head figures for any supported model and text.

UI only. One forward pass (cached per model, device, dtype and text) records every layer, so changing the
layer, the head or "exclude first token" redraws from the cache without running the model again.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re

import altair as alt
import streamlit as st

from analysis import (
    AnalysisResult,
    Capture,
    HeadscopeError,
    LoadedModel,
    ModelInfo,
    analyze_induction_probe,
    capture,
    default_layer,
    load_model,
    summarize,
)
from analysis.capture import PATTERN_BUDGET, pattern_bytes
from analysis.corpus import CorpusResult, analyze_corpus, parse_texts
from analysis.parity import parity_tolerance, result_parity_failures
from analysis.presets import FIJI, PRESETS
from reports.charts import (
    ATLAS_SELECTION,
    MAX_AXIS_CELLS,
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_atlas_chart,
    build_corpus_atlas_chart,
    build_layer_charts,
    display_token,
    selected_head,
)
from reports.html import render_corpus_report, render_report
from reports.provenance import results_json

MODELS = {
    "auto": "auto (gpt2 if cached, else the bundled MiniLM)",
    "minilm": "bundled all-MiniLM-L6-v2 (works offline)",
    "gpt2": "gpt2",
    "distilgpt2": "distilgpt2",
    "gpt2-medium": "gpt2-medium",
}
DEVICES = ["cpu", "auto", "cuda"]
DTYPES = ["float32", "bfloat16", "float16"]
DEFAULT_MODEL_ENV = "HEADSCOPE_MODEL"  # the model a link without ?model= opens (a Community Cloud secret can set it)
MAX_URL_TEXT = 1500  # longer texts are left out of the shareable link
APPLIED, LAST_GOOD, DEFAULTS, TEXT_VERSION = "applied", "last_good", "defaults", "text_version"  # session state
ATLAS, PROBE, ATLAS_SCORE, CORPUS, CORPUS_FILE = "atlas", "probe", "atlas_score", "corpus", "corpus_file"  # keys
NOT_UTF8 = "{name} is not UTF-8 text (bad byte at offset {offset}): save it as UTF-8 and upload it again."
PARITY_FAILED_BOX = ("Parity failed on layer {layer}: the pattern rebuilt from the captured q and k differs from the "
                     "model's own attention by up to {err:.1e}, more than the {tolerance:.0e} allowed for {dtype}. "
                     "The figures below may not describe what the model computed.")
UNEXPECTED = ("The analysis failed unexpectedly ({kind}: {message}). Try another model, device or dtype, or a "
              "shorter text; the server log has the details.")
HEAD_RANGE = "Head {head} is out of range: {model} has heads 0..{last} in each layer."
TOKEN_CSS = ("display:inline-block;margin:1px;padding:0 4px;border-radius:4px;white-space:pre;"
             "font-family:monospace;font-size:0.85em;")

log = logging.getLogger("headscope.app")


def padded(chart: alt.TopLevelMixin, kind: str = "pad") -> alt.TopLevelMixin:
    """Streamlit's default autosize "fit" squeezes titles, axes and legends into the spec's size; keep them outside."""
    return chart.properties(autosize=alt.AutoSizeParams(type=kind, contains="padding"))


@st.cache_resource(max_entries=2, show_spinner=False)
def get_model(model: str, device: str, dtype: str) -> LoadedModel:
    return load_model(model, device, dtype)


@st.cache_data(max_entries=4, show_spinner=False)
def get_capture(model: str, device: str, dtype: str, text: str, pattern_layers: tuple[int, ...] | None) -> Capture:
    return capture(get_model(model, device, dtype), text, pattern_layers, keep_patterns=True)


@st.cache_data(max_entries=32, show_spinner=False)
def get_result(model: str, device: str, dtype: str, text: str, pattern_layers: tuple[int, ...] | None, layer: int,
               exclude_first_token: bool) -> AnalysisResult:
    captured = get_capture(model, device, dtype, text, pattern_layers)
    return summarize(captured, get_model(model, device, dtype).info.to_dict(), [layer], exclude_first_token)


@st.cache_data(max_entries=4, show_spinner=False)
def get_probe(model: str, device: str, dtype: str, exclude_first_token: bool) -> AnalysisResult:
    """The induction probe's head scores (every layer, no per-layer figures): one forward pass per model."""
    return analyze_induction_probe(get_model(model, device, dtype), layers=[], exclude_first_token=exclude_first_token)


def init_state() -> None:
    """Widget defaults from the link (model, layer, head, text) the first time a session runs.

    The defaults are passed to the widgets as `value=` rather than written into their session-state keys: a
    value written that way is lost (the widget shows its blank default) when Analyse interrupts the first run.
    """
    if DEFAULTS in st.session_state:
        return
    params = st.query_params
    model = params.get("model", os.environ.get(DEFAULT_MODEL_ENV, "auto"))
    known = model in MODELS
    as_int = lambda value: int(value) if value is not None and value.isdigit() else None
    defaults = {"model_choice": model if known else "auto", "model_typed": "" if known else model, "device": "cpu",
                "dtype": "float32", "text": params.get("text", FIJI), "layer": as_int(params.get("layer")),
                "head": as_int(params.get("head")) or 0, "exclude": True}
    st.session_state[DEFAULTS], st.session_state[TEXT_VERSION] = defaults, 0
    st.session_state[APPLIED] = settings_from(defaults)


def settings_from(values: dict) -> dict:
    return {"model": values["model_typed"].strip() or values["model_choice"], "device": values["device"],
            "dtype": values["dtype"], "text": values["text"], "layer": values["layer"], "head": int(values["head"] or 0),
            "exclude": bool(values["exclude"])}


def fill_preset() -> None:
    """A preset replaces the text: a fresh text widget (new key) starts from it."""
    if st.session_state.preset:
        st.session_state[DEFAULTS]["text"] = PRESETS[st.session_state.preset]
        st.session_state[TEXT_VERSION] += 1


def sidebar_ui() -> None:
    d = st.session_state[DEFAULTS]
    with st.sidebar:
        st.header("headscope")
        st.selectbox("Fill the text with a preset", list(PRESETS), index=None, key="preset", on_change=fill_preset,
                     placeholder="Choose a preset text…")
        with st.form("settings"):
            values = {
                "model_choice": st.selectbox("Model", list(MODELS), index=list(MODELS).index(d["model_choice"]),
                                             format_func=MODELS.get, key="model_choice"),
                "model_typed": st.text_input("…or a hub id or local checkpoint path", d["model_typed"], key="model_typed",
                                             placeholder="e.g. EleutherAI/pythia-70m"),
            }
            device, dtype = st.columns(2)
            values["device"] = device.selectbox("Device", DEVICES, DEVICES.index(d["device"]), key="device")
            values["dtype"] = dtype.selectbox("Dtype", DTYPES, DTYPES.index(d["dtype"]), key="dtype")
            values["text"] = st.text_area("Text", d["text"], height=160, key=f"text-{st.session_state[TEXT_VERSION]}")
            layer, head = st.columns(2)
            values["layer"] = layer.number_input("Layer", min_value=0, value=d["layer"], step=1, key="layer",
                                                 placeholder="default")
            values["head"] = head.number_input("Head", min_value=0, value=d["head"], step=1, key="head")
            values["exclude"] = st.toggle("Exclude first token", d["exclude"], key="exclude",
                                          help="Leave position 0 out of the Q/K statistics and the dot products, as "
                                               "the notebook does.")
            if st.form_submit_button("Analyse", type="primary", width="stretch"):
                st.session_state[APPLIED] = settings_from(values)


def pattern_layers_for(loaded: LoadedModel, text: str, layer: int) -> tuple[int, ...] | None:
    """Every layer's T x T patterns when they fit PATTERN_BUDGET (layer changes are then free), else just `layer`."""
    info = loaded.info
    n = len(loaded.tokenizer(text)["input_ids"]) if text.strip() else 0
    return None if pattern_bytes(info.n_heads, n, info.n_layers) <= PATTERN_BUDGET else (layer,)


def analyse(settings: dict) -> tuple[AnalysisResult, LoadedModel, int, int]:
    keys = settings["model"], settings["device"], settings["dtype"]
    with st.status(f"Loading {settings['model']}…", expanded=False) as status:
        loaded = get_model(*keys)
        info = loaded.info
        layer = default_layer(info.n_layers) if settings["layer"] is None else int(settings["layer"])
        if not 0 <= settings["head"] < info.n_heads:
            raise HeadscopeError(HEAD_RANGE.format(head=settings["head"], model=info.id, last=info.n_heads - 1))
        status.update(label=f"Analysing the text with {info.id}…")
        text = settings["text"]
        result = get_result(*keys, text, pattern_layers_for(loaded, text, layer), layer, settings["exclude"])
        status.update(label=f"Analysed {result.n_tokens} tokens with {info.id}, layer {layer}", state="complete")
    return result, loaded, layer, settings["head"]


def tokens_ui(result: AnalysisResult) -> None:
    special = set(result.special_positions)
    spans = []
    for pos, token in enumerate(result.tokens):
        style = "background:#dbe7f7;border:1px solid #3b6fb6;font-weight:600;" if pos in special else "background:#eef0f2;"
        title = f"position {pos}, id {int(result.token_ids[pos])}" + (", special token" if pos in special else "")
        spans.append(f'<span title="{html.escape(title)}" style="{TOKEN_CSS}{style}">{html.escape(display_token(token))}</span>')
    st.markdown(f"**Tokens** ({result.n_tokens}; special tokens outlined in blue)", help="Hover a token for its position and id.")
    st.markdown("".join(spans), unsafe_allow_html=True)
    first = f"`{display_token(result.tokens[0])}`" + (" (a special token)" if 0 in special else "")
    effect = ("is left out of the Q/K statistics and the dot products" if result.exclude_first_token
              else "is included in the Q/K statistics and the dot products")
    st.caption(f"The first token is {first} at position 0; with the current setting it {effect}.")


def select_head() -> None:
    """on_select of the atlas: the clicked cell's layer and head become the shown ones (and the form's values)."""
    picked = selected_head(st.session_state[ATLAS].selection)
    if picked is None:
        return
    layer, head = picked
    st.session_state[APPLIED] = {**st.session_state[APPLIED], "layer": layer, "head": head}
    st.session_state[DEFAULTS].update(layer=layer, head=head)
    for key in ("layer", "head"):  # the form's number inputs start again from the new defaults
        st.session_state.pop(key, None)


def probe_toggled() -> None:
    """Turning the probe on shows its induction scores, the ones it exists for; off, the text's scores again."""
    st.session_state[ATLAS_SCORE] = "probe:induction" if st.session_state[PROBE] else None


def atlas_ui(result: AnalysisResult, settings: dict) -> None:
    st.subheader("Head atlas: every layer and head")
    st.caption("One score for every head of the model, from the same forward pass. Click a cell to show that head's "
               "figures below; double-click clears the selection.")
    sources = {"text": result}
    if st.checkbox("Run the induction probe", key=PROBE, on_change=probe_toggled,
                   help="Analyse a seeded random token sequence written twice (once per model, then cached): on it, "
                        "induction scores mean something whatever your text repeats."):
        try:
            with st.spinner("Running the induction probe…"):
                sources["probe"] = get_probe(settings["model"], settings["device"], settings["dtype"],
                                             settings["exclude"])
        except HeadscopeError as exc:
            st.error(str(exc))
    options = [f"{source}:{score}" for source, found in sources.items() for score in found.head_scores]
    if not options:
        return
    if st.session_state.get(ATLAS_SCORE) not in options:
        st.session_state[ATLAS_SCORE] = options[0]
    label = lambda option: SCORE_TITLES.get(option.split(":")[1], option) + (
        " (induction probe)" if option.startswith("probe:") else " (your text)")
    choice = st.selectbox("Score", options, format_func=label, key=ATLAS_SCORE)
    source, score = choice.split(":")
    st.caption(SCORE_EXPLANATIONS.get(score, ""))
    st.altair_chart(padded(build_atlas_chart(sources[source], score)), key=ATLAS, on_select=select_head,
                    selection_mode=ATLAS_SELECTION, width="content")


def corpus_ui(settings: dict) -> None:
    with st.expander("Many texts: means over a corpus with bootstrap confidence intervals", expanded=CORPUS in st.session_state):
        upload = st.file_uploader("One text per line (.txt), or JSON Lines with a \"text\" field (.jsonl)",
                                  type=["txt", "jsonl"], key=CORPUS_FILE)
        if upload is not None and st.button("Analyse the corpus", key="corpus_run"):
            try:
                data = upload.getvalue().decode("utf-8")
            except UnicodeDecodeError as exc:
                st.error(NOT_UTF8.format(name=upload.name, offset=exc.start))
                return
            try:
                texts = parse_texts(data, upload.name)
                bar = st.progress(0.0, text=f"Analysing {len(texts)} texts…")
                st.session_state[CORPUS] = analyze_corpus(
                    get_model(settings["model"], settings["device"], settings["dtype"]), texts, settings["exclude"],
                    progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} texts"))
                bar.empty()
            except HeadscopeError as exc:
                st.error(str(exc))
                return
        if CORPUS in st.session_state:
            corpus_results_ui(st.session_state[CORPUS])


def corpus_results_ui(corpus: CorpusResult) -> None:
    st.caption(f"{corpus.n_analysed} of {len(corpus.texts)} texts analysed with {corpus.model['id']}, one forward "
               f"pass each; {corpus.level:.0%} percentile bootstrap intervals over texts ({corpus.n_boot} resamples, "
               f"seed {corpus.seed}).")
    for record in corpus.failures:
        st.warning(f"Text {record.number} was skipped: {record.error}")
    name = st.selectbox("Per-head number", list(corpus.values), format_func=lambda n: SCORE_TITLES.get(n, n),
                        key="corpus_score")
    st.caption(SCORE_EXPLANATIONS.get(name, ""))
    st.altair_chart(padded(build_corpus_atlas_chart(corpus, name)), width="content")
    rows = [{"head": f"L{layer}H{head}", "mean": corpus.means[name][layer, head],
             "CI low": corpus.low[name][layer, head], "CI high": corpus.high[name][layer, head]}
            for layer in range(corpus.means[name].shape[0]) for head in range(corpus.means[name].shape[1])]
    st.dataframe(rows, hide_index=True, height=240)
    st.download_button("Download the corpus report (HTML)", lambda: render_corpus_report(corpus),
                       file_name="headscope-corpus.html", mime="text/html", on_click="ignore")


def results_ui(result: AnalysisResult, info: ModelInfo, layer: int, head: int, settings: dict) -> None:
    kv = f", {info.n_kv_heads} key heads" if info.n_kv_heads != info.n_heads else ""
    st.info(f"**{info.id}**: {info.family}, {info.n_layers} layers × {info.n_heads} heads{kv}, {info.dtype} on "
            f"{info.device}. {info.reason}")
    for warning in result.warnings:
        st.warning(warning)
    tokens_ui(result)
    data = result.layers[layer]
    err = data.parity_max_abs_err
    agreement = f"to {err:.0e}" if err else "exactly"
    if layer in result_parity_failures(result):  # not the green box: these figures may not be the model's
        st.warning(PARITY_FAILED_BOX.format(layer=layer, err=err, dtype=info.dtype,
                                            tolerance=parity_tolerance(info.dtype)))
    else:
        st.success(f"Parity: the pattern rebuilt from the captured q and k matches the model's own attention "
                   f"{agreement} (largest absolute difference over layer {layer}'s heads: {err:.1e}).")
    atlas_ui(result, settings)
    st.subheader(f"Layer {layer}, head {head}: the notebook's figures")
    positions = None
    if result.n_tokens > MAX_AXIS_CELLS:
        positions = st.slider("Heatmap window (token positions)", 0, result.n_tokens, (0, result.n_tokens),
                              key=f"window-{result.n_tokens}",
                              help=f"Narrow the window to {MAX_AXIS_CELLS} tokens or fewer to see single tokens.")
    for item in build_layer_charts(result, layer, head, positions):
        st.subheader(item.title)
        st.caption(item.explanation)
        stretch = item.key != "heatmap"  # the heatmap keeps its square cells; the others fill the page's width
        st.altair_chart(padded(item.chart, "fit-x" if stretch else "pad"), width="stretch" if stretch else "content")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info.id).strip("-")
    st.download_button("Download the results (JSON)", json.dumps(results_json(result, head)),  # with provenance
                       file_name=f"headscope-{slug}-L{layer}.json", mime="application/json", on_click="ignore")
    # rendered only when clicked: the same function, hence the same bytes (apart from the time), as --html
    st.download_button("Download HTML report", lambda: render_report(result, head=head),
                       file_name=f"headscope-{slug}-L{layer}.html", mime="text/html", on_click="ignore")


def share_link(settings: dict, layer: int, head: int) -> None:
    params = {"model": settings["model"], "layer": str(layer), "head": str(head)}
    if len(settings["text"]) <= MAX_URL_TEXT:
        params["text"] = settings["text"]
    st.query_params.from_dict(params)


def main() -> None:
    st.set_page_config(page_title="headscope", layout="wide")
    init_state()
    sidebar_ui()
    st.title("headscope: attention heads, one forward pass")
    settings = st.session_state[APPLIED]
    try:
        result, loaded, layer, head = analyse(settings)
    except HeadscopeError as exc:
        st.error(str(exc))
    except Exception as exc:
        log.exception("analysis failed")
        st.error(UNEXPECTED.format(kind=type(exc).__name__, message=exc))
    else:
        st.session_state[LAST_GOOD] = (result, loaded.info, settings, layer, head)
        share_link(settings, layer, head)
    if LAST_GOOD in st.session_state:
        result, info, good, layer, head = st.session_state[LAST_GOOD]
        if good is not settings:
            st.caption("Showing the last successful analysis.")
        results_ui(result, info, layer, head, good)
    corpus_ui(settings)


main()
