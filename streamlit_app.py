"""headscope's one-page app: the notebook's attention-head figures for any supported model and text.

UI only. One forward pass (cached per model, device, dtype and text) records every layer, so changing the
layer, the head or "exclude first token" redraws from the cache without running the model again.

State: the applied settings (`APPLIED`) are what the page shows. Analyse (the form's callback), a click on the
atlas (its on_select callback) and the browser's Back and Forward (init_state) change them, and each also writes the
sidebar's widgets, so the sidebar, the atlas outline, the figures and the link (written last, from the same
settings) always agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import textwrap
import weakref
from collections.abc import Callable
from typing import Any

import altair as alt
import numpy as np
import streamlit as st
from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec  # what st.altair_chart sends
from streamlit.runtime.scriptrunner import get_script_run_ctx

from analysis import (
    BATCH_SIZE,
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
from analysis.cache import ByteBudgetCache
from analysis.capture import patterns_fit, resolve_query
from analysis.corpus import CorpusResult, analyze_corpus, parse_texts
from analysis.loading import MODEL_DIRS_ENV, allowed_model_dirs, check_app_dir
from analysis.parity import describe_tolerance, result_parity_failures
from analysis.presets import FIJI, PRESETS
from analysis.results import OLD_SCORE_DEFINITION, OLD_SCORES_NOTE
from reports.charts import (
    ATLAS_SELECTION,
    MAX_AXIS_CELLS,
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_atlas_chart,
    build_corpus_atlas_chart,
    build_heatmap_chart,
    build_layer_charts,
    display_token,
    selected_head,
)
from reports.figures import FIGURE_HELP, figure_name, render_figure
from reports.html import render_corpus_report, render_report, with_probe_results
from reports.provenance import corpus_command, results_json
from reports.untrusted import LINK_TEXT_LEFT_OUT, literal, needs_text_file, parse_link, plain, visible

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
CACHE_MB_ENV = "HEADSCOPE_CACHE_MB"  # byte budget of the shared result cache, in MiB
CACHE_BUDGET = int(os.environ.get(CACHE_MB_ENV, "640")) * 2**20
SPEC_BUDGET = 64 * 2**20  # the converted chart specs (their data as Arrow bytes), shared by every session
MAX_URL_TEXT = 1500  # longer texts are left out of the shareable link
APP_HEATMAP_SIDE = 360  # px: the heatmap shares a row with the atlas
FIGURES = "figures"  # the tabs of the notebook's figures: only the open one is computed and drawn
FIGURE_TABS = {"Q and K": ("means", "qk_means", "qk_stds"), "q·k dot products": ("dot_products", "dot_distributions"),
               "Softmax weights": ("softmax", "sink_mass", "kde")}
# one screen holds more: Streamlit's 6rem top padding, less, but clear of its 3.75rem header (it takes the clicks)
PAGE_CSS = "<style>[data-testid='stMainBlockContainer']{padding-top:4rem;}</style>"
APPLIED, LAST_GOOD, DEFAULTS, TEXT_VERSION = "applied", "last_good", "defaults", "text_version"  # session state
RESULTS_DIR = "corpus_results_dir"  # session-state key of the results folder's path
CORPUS_INPUT = "corpus_input"  # session state: (an upload's name or a folder, the page's run[, its corpus.json])
ATLAS, PROBE, ATLAS_SCORE, CORPUS, CORPUS_FILE = "atlas", "probe", "atlas_score", "corpus", "corpus_file"  # keys
ATLAS_DRAWN = "atlas_drawn"  # session state: (what its scores depend on, (layer, head) outlined, key) of the atlas
LAYER, HEAD, HEAD_VERSION = "layer", "head", "head_version"  # the sidebar's number inputs are keyed layer-{version}
SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
QUERY = "query"  # the query token's position (None: the model's default), from the link or a click on the strip
MAX_UPLOAD_MB, MAX_UPLOAD_TEXTS = 5, 1000  # the corpus upload's limits (Streamlit's MB are MiB)
UPLOAD_TOO_LARGE = "{name} is {size:.1f} MB; the app takes files up to {max} MB: use python -m reports --batch instead."
TOO_MANY_TEXTS = ("{name} holds {n:,} texts; the app analyses at most {max:,} per upload: split the file, or use "
                  "python -m reports --batch.")
LINK_NOTICES = "link_notices"  # session state: what was wrong with the link that opened the page
LINK_WRITTEN, LINK_LONG_TEXT = "link_written", "link_long_text"  # session state: the params share_link last wrote,
# and the last text too long for them (long_text=1): what Back to such a link shows
NOT_UTF8 = "{name} is not UTF-8 text (bad byte at offset {offset}): save it as UTF-8 and upload it again."
NO_USABLE_TEXT = "{name} holds no text that can be analysed; its first line: {error}"
MAX_FAILURE_BOXES = 5  # skipped texts shown as a warning each; more: one warning and a table
NONE_ANALYSED = "No text in {name} could be analysed ({n:,} tried); text {number}: {error}"
PARITY_FAILED_BOX = ("Parity failed on layer {layer}: the pattern rebuilt from the captured q and k differs from the "
                     "model's own attention by up to {err:.1e}, more than allowed for {dtype} ({allowed}). "
                     "The figures below may not describe what the model computed.")
UNEXPECTED = ("The analysis failed unexpectedly ({kind}: {message}). Try another model, device or dtype, or a "
              "shorter text; the server log has the details.")
HEAD_RANGE = "Head {head} is out of range: {model} has heads 0..{last} in each layer."
LAYER_RANGE = "Layer {layer} is out of range: {model} has layers 0..{last}."

log = logging.getLogger("headscope.app")


def fit_title(chart: alt.TopLevelMixin, model_id: str, chars: int) -> alt.TopLevelMixin:
    """The chart (changed in place) without " · model" in its title, since the model line above names the model,
    and with its subtitle lines wrapped at `chars` characters: Vega cuts a title line off at the chart's width."""
    title = chart.title
    title.text = title.text.removesuffix(f" · {model_id}")
    subtitle = [] if title.subtitle is alt.Undefined else [title.subtitle] if isinstance(title.subtitle, str) \
        else list(title.subtitle)
    title.subtitle = [line for part in subtitle for line in textwrap.wrap(part, chars) or [""]]
    return chart


def padded(chart: alt.TopLevelMixin, kind: str = "pad") -> alt.TopLevelMixin:
    """Streamlit's default autosize "fit" squeezes titles, axes and legends into the spec's size; keep them outside."""
    return chart.properties(autosize=alt.AutoSizeParams(type=kind, contains="padding"))


# ----------------------------------------------------------------------------------------- cached work


def model_dirs() -> list:
    """The operator's allowed checkpoint directories: HEADSCOPE_MODEL_DIRS, from the environment or a secret."""
    value = os.environ.get(MODEL_DIRS_ENV)
    if value is None and st.secrets.load_if_toml_exists():
        value = st.secrets.get(MODEL_DIRS_ENV)
    return allowed_model_dirs(os.pathsep.join(value) if isinstance(value, list | tuple) else str(value or ""))


@st.cache_resource(max_entries=2, show_spinner=False)
def get_model(model: str, device: str, dtype: str) -> LoadedModel:
    return load_model(model, device, dtype, allowed_roots=model_dirs())  # local paths: only the operator's dirs


@st.cache_resource(show_spinner=False)
def models_loaded() -> set:
    """(model, device, dtype) of every model get_model has loaded, in any session (one evicted since loads again,
    only without the status box)."""
    return set()


@st.cache_resource(show_spinner=False)
def result_cache() -> ByteBudgetCache:
    """Captures and results, shared by every session without copies, least recently used out past CACHE_BUDGET."""
    return ByteBudgetCache(CACHE_BUDGET)


@st.cache_resource(show_spinner=False)
def spec_cache() -> ByteBudgetCache:
    """Charts as st.altair_chart sends them, made once per result and view and shared by every session.

    Building a chart and Altair's schema validation of it (inside to_dict) took 40-130 ms a chart on every rerun.
    """
    return ByteBudgetCache(SPEC_BUDGET)


def shared(source, view: tuple, make: Callable[[], Any]) -> Any:
    """make()'s value for `source` (a result) and `view` (what else it depends on), made once for every session.

    The key holds id(source) and the entry a weak reference to it: an object born at a freed one's address is not
    handed the freed one's value."""
    ref, value = spec_cache().get((id(source), *view), lambda: (weakref.ref(source), make()))
    return value if ref() is source else make()


def frozen_spec(chart: alt.TopLevelMixin) -> tuple[str, dict]:
    """What st.altair_chart would send for `chart`: the spec as JSON, and its datasets as Arrow bytes."""
    spec = _convert_altair_to_vega_lite_spec(chart)
    datasets = spec.pop("datasets")
    return json.dumps(spec), datasets


def vega_spec(frozen: tuple[str, dict]) -> dict:
    """A fresh spec dict from a frozen one, for st.vega_lite_chart (it edits the dict it is given)."""
    text, datasets = frozen
    return {**json.loads(text), "datasets": dict(datasets)}


def get_capture(model: str, device: str, dtype: str, text: str, pattern_layers: tuple[int, ...] | None) -> Capture:
    return result_cache().get(("capture", model, device, dtype, text, pattern_layers), lambda: capture(
        get_model(model, device, dtype), text, pattern_layers, keep_patterns=True))


def result_key(model: str, device: str, dtype: str, text: str, pattern_layers: tuple[int, ...] | None, layer: int,
               exclude_first_token: bool, query: int | None = None, special_keys: bool = False,
               exclude_bos: bool = True) -> tuple:
    return ("result", model, device, dtype, text, pattern_layers, layer, exclude_first_token, query, special_keys,
            exclude_bos)


def get_result(model: str, device: str, dtype: str, text: str, pattern_layers: tuple[int, ...] | None, layer: int,
               exclude_first_token: bool, query: int | None = None, special_keys: bool = False,
               exclude_bos: bool = True) -> AnalysisResult:
    """A layer's measurements from the cached capture: the query token and the exclusions change no forward pass
    (the capture keeps the shown layer's pattern, whose rows give any query's read-out)."""
    def make() -> AnalysisResult:
        captured = get_capture(model, device, dtype, text, pattern_layers)
        return summarize(captured, get_model(model, device, dtype).info.to_dict(), [layer], exclude_first_token,
                         query_position=query, exclude_special_keys=special_keys, exclude_bos=exclude_bos)

    return result_cache().get(result_key(model, device, dtype, text, pattern_layers, layer, exclude_first_token, query,
                                         special_keys, exclude_bos), make)


def get_probe(model: str, device: str, dtype: str, exclude_first_token: bool,
              exclude_bos: bool = True) -> AnalysisResult:
    """The induction probe's head scores (every layer, no per-layer figures): one forward pass per model."""
    return result_cache().get(("probe", model, device, dtype, exclude_first_token, exclude_bos),
                              lambda: analyze_induction_probe(get_model(model, device, dtype), layers=[],
                                                              exclude_first_token=exclude_first_token,
                                                              exclude_bos=exclude_bos))


# ----------------------------------------------------------------------------------------- state


def init_state() -> None:
    """Widget defaults from the link (model, layer, head, text, probe, score) the first time a session runs, and
    again when the browser's Back or Forward brings another link (navigated()): its view is then shown as a link's.

    The defaults are passed to the widgets as `value=` rather than written into their session-state keys: a
    value written that way is lost (the widget shows its blank default) when Analyse interrupts the first run.
    """
    state = st.session_state
    if DEFAULTS in state and not navigated():
        return
    link, state[LINK_NOTICES] = parse_link(st.query_params)  # a bad value is dropped with a notice
    text = link["text"]
    if link["long_text"] and text is None:  # the link was made from a text too long for it
        text = state.get(LINK_LONG_TEXT)  # this session's, after Back; on opening: the default text, said so
        if text is None:
            state[LINK_NOTICES].append(LINK_TEXT_LEFT_OUT.format(max=MAX_URL_TEXT))
    model = link["model"] or os.environ.get(DEFAULT_MODEL_ENV, "auto")
    known = model in MODELS
    defaults = {"model_choice": model if known else "auto", "model_typed": "" if known else model, "device": "cpu",
                "dtype": link["dtype"] or "float32", "text": FIJI if text is None else text,
                LAYER: link["layer"], HEAD: link["head"] or 0, "exclude": not link["keep_first"], PROBE: link["probe"],
                "special_keys": link["special_keys"], "exclude_bos": not link["keep_bos"], QUERY: link["query"]}
    if DEFAULTS in state:
        follow_link(defaults)
    else:
        state[DEFAULTS], state[TEXT_VERSION], state[HEAD_VERSION] = defaults, 0, 0
    state[APPLIED] = settings_from(state[DEFAULTS])
    state[ATLAS_SCORE] = link["score"]  # ?score=text:induction; None: the atlas's first score


def navigated() -> bool:
    """Whether this run is the browser's Back or Forward to a link the app did not write last.

    Streamlit (1.67) reruns the script on Back and Forward with the URL's params, marked as a history navigation;
    writing the link in that run replaces the URL instead of adding to the history. Any other run's params are the
    app's own link, or an older one that a click sent before the browser had the last: not a navigation.
    """
    written = st.session_state.get(LINK_WRITTEN)
    return (getattr(get_script_run_ctx(), "is_history_navigation", False) and written is not None
            and dict(st.query_params) != written)


def follow_link(defaults: dict) -> None:
    """Back or Forward: the link's view (`defaults`) in every widget. The text, layer and head inputs get fresh keys
    (a fresh widget starts from its default); the others are written, as a widget's value set from code is. The
    device, which a link does not carry, stays."""
    state = st.session_state
    state[DEFAULTS].update({**defaults, "device": state[DEFAULTS]["device"]})
    state[TEXT_VERSION] += 1  # also a fresh token strip, with the link's query token chosen
    state[HEAD_VERSION] += 1
    for key in ("model_choice", "model_typed", "dtype", "exclude", "special_keys", "exclude_bos", PROBE):
        state[key] = defaults[key]


def settings_from(values: dict) -> dict:
    return {"model": values["model_typed"].strip() or values["model_choice"], "device": values["device"],
            "dtype": values["dtype"], "text": values["text"], "layer": values[LAYER],
            "head": int(values[HEAD] or 0), "exclude": bool(values["exclude"]),
            "special_keys": bool(values.get("special_keys", False)),
            "exclude_bos": bool(values.get("exclude_bos", True)), "query": values.get(QUERY)}


def widget_key(name: str) -> str:
    """The sidebar's layer and head inputs get fresh keys whenever the shown head changes elsewhere (an atlas click,
    the default layer resolved): a fresh widget starts from its new default. Writing the new value into an existing
    widget's state instead is lost when Analyse interrupts a run before the browser has that widget's value."""
    return f"{name}-{st.session_state[HEAD_VERSION]}"


def show_head(layer: int, head: int) -> None:
    """Make (layer, head) the shown head everywhere: the applied settings and the sidebar's two inputs.

    Only callbacks and code that runs before the sidebar is drawn may call this.
    """
    st.session_state[APPLIED] = {**st.session_state[APPLIED], "layer": layer, "head": head}
    st.session_state[DEFAULTS].update({LAYER: layer, HEAD: head})
    st.session_state[HEAD_VERSION] += 1


def apply_form() -> None:
    """Analyse: the form's values become the applied settings (a callback, so it runs before anything is drawn)."""
    state = st.session_state
    values = {key: state[key] for key in ("model_choice", "model_typed", "device", "dtype", "exclude", "special_keys",
                                          "exclude_bos")}
    values.update({LAYER: state[widget_key(LAYER)], HEAD: state[widget_key(HEAD)]})
    values["text"] = state[f"text-{state[TEXT_VERSION]}"]
    before = state[APPLIED]
    same_input = settings_from(values)["model"] == before["model"] and values["text"] == before["text"]
    values[QUERY] = before.get("query") if same_input else None  # a new text or model: its default query token
    state[DEFAULTS].update(values)
    state[APPLIED] = settings_from(values)
    state[LINK_NOTICES] = []  # the view is the user's now, not the link's: its bad values no longer matter


def fill_preset() -> None:
    """A preset replaces the text: a fresh text widget (new key) starts from it."""
    if st.session_state.preset:
        st.session_state[DEFAULTS]["text"] = PRESETS[st.session_state.preset]
        st.session_state[TEXT_VERSION] += 1


def choose_query(key: str) -> None:
    """on_change of the token strip: the clicked token becomes the query token (clicked again: the default)."""
    st.session_state[APPLIED] = {**st.session_state[APPLIED], "query": st.session_state[key]}
    st.session_state[DEFAULTS][QUERY] = st.session_state[key]
    st.session_state[LINK_NOTICES] = []  # the view is the user's now, not the link's


def select_head(key: str) -> None:
    """on_select of the atlas: the clicked cell's layer and head become the shown ones (and the form's values)."""
    picked = selected_head(st.session_state[key].selection)
    if picked is not None:
        show_head(*picked)
        st.session_state[LINK_NOTICES] = []  # the view is the user's now, not the link's


def probe_toggled() -> None:
    """Turning the probe on shows its induction scores, the ones it exists for; off, the text's scores again."""
    st.session_state[ATLAS_SCORE] = "probe:induction" if st.session_state[PROBE] else None


def share_link(settings: dict) -> None:
    """The URL reproduces the view: model, layer, head, text (when short), what changes the numbers (dtype, the
    exclusions, the query token), the probe and the atlas score. Not the device: another server may have none."""
    params = {"model": settings["model"]}
    if settings["dtype"] != "float32":
        params["dtype"] = settings["dtype"]
    if settings["layer"] is not None:
        params.update(layer=str(settings["layer"]), head=str(settings["head"]))
    if len(settings["text"]) <= MAX_URL_TEXT:
        params["text"] = settings["text"]
        if settings.get("query") is not None:  # a position of this text: without it the link's text is another
            params["query"] = str(settings["query"])
    else:  # the link opens the default text: it says so (LINK_TEXT_LEFT_OUT) instead of passing it off as this one
        params["long_text"] = "1"
    if not settings["exclude"]:
        params["keep_first"] = "1"
    if settings.get("special_keys"):
        params["special_keys"] = "1"
    if not settings.get("exclude_bos", True):
        params["keep_bos"] = "1"
    if st.session_state.get(PROBE):
        params[PROBE] = "1"
    if st.session_state.get(ATLAS_SCORE):
        params["score"] = st.session_state[ATLAS_SCORE]
    if dict(st.query_params) != params:
        st.query_params.from_dict(params)
    st.session_state[LINK_WRITTEN] = params  # a later run with other params is Back or Forward (navigated())
    if "long_text" in params:
        st.session_state[LINK_LONG_TEXT] = settings["text"]


# ----------------------------------------------------------------------------------------- sidebar


def sidebar_ui() -> None:
    d = st.session_state[DEFAULTS]
    with st.sidebar:
        st.header("headscope")
        st.selectbox("Fill the text with a preset", list(PRESETS), index=None, key="preset", on_change=fill_preset,
                     placeholder="Choose a preset text…")
        with st.form("settings"):
            st.selectbox("Model", list(MODELS), index=list(MODELS).index(d["model_choice"]), format_func=MODELS.get,
                         key="model_choice")
            st.text_input("…or a hub id or local checkpoint path", d["model_typed"], key="model_typed",
                          placeholder="e.g. EleutherAI/pythia-70m")
            device, dtype = st.columns(2)
            device.selectbox("Device", DEVICES, DEVICES.index(d["device"]), key="device")
            dtype.selectbox("Dtype", DTYPES, DTYPES.index(d["dtype"]), key="dtype")
            st.text_area("Text", d["text"], height=160, key=f"text-{st.session_state[TEXT_VERSION]}")
            layer, head = st.columns(2)
            layer.number_input("Layer", min_value=0, value=d[LAYER], step=1, key=widget_key(LAYER),
                               placeholder="default")
            head.number_input("Head", min_value=0, value=d[HEAD], step=1, key=widget_key(HEAD))
            st.toggle("Exclude first token", d["exclude"], key="exclude",
                      help="Leave position 0 out of the Q/K statistics and the dot products, as the notebook does.")
            st.toggle("Exclude special keys", d["special_keys"], key="special_keys",
                      help="Leave the special tokens (BOS, CLS, SEP, ...) out of the query token's keys.")
            st.toggle("Exclude BOS (atlas scores)", d["exclude_bos"], key="exclude_bos",
                      help="Leave position 0 out of the atlas's scores when it is a special token (BOS, CLS), as "
                           "TransformerLens's exclude_bos; a first word is always kept.")
            st.form_submit_button("Analyse", type="primary", width="stretch", on_click=apply_form)


# ----------------------------------------------------------------------------------------- one text


def pattern_layers_for(loaded: LoadedModel, text: str, layer: int) -> tuple[int, ...] | None:
    """Every layer's T x T patterns when they fit PATTERN_BUDGET (layer changes are then free), else just `layer`."""
    info = loaded.info
    n = len(loaded.tokenizer(text)["input_ids"]) if text.strip() else 0
    return None if patterns_fit(info.n_heads, n, info.n_layers) else (layer,)


def load(settings: dict, slot) -> LoadedModel:
    """The model, and the settings' layer resolved (a link without ?layer= shows the default layer, named)."""
    keys = settings["model"], settings["device"], settings["dtype"]
    if keys in models_loaded():
        loaded = get_model(*keys)  # no status box: st.status sleeps 50 ms as it opens and again as it closes
    else:
        with slot.status(f"Loading {plain(settings['model'])}…", expanded=False):
            loaded = get_model(*keys)
        models_loaded().add(keys)
    info = loaded.info
    if settings["layer"] is None:
        show_head(default_layer(info.n_layers), settings["head"])
    settings = st.session_state[APPLIED]
    if not 0 <= settings["layer"] < info.n_layers:
        raise HeadscopeError(LAYER_RANGE.format(layer=settings["layer"], model=info.id, last=info.n_layers - 1))
    if not 0 <= settings["head"] < info.n_heads:
        raise HeadscopeError(HEAD_RANGE.format(head=settings["head"], model=info.id, last=info.n_heads - 1))
    return loaded


def analyse(settings: dict, loaded: LoadedModel, slot) -> AnalysisResult:
    keys, text, layer = (settings["model"], settings["device"], settings["dtype"]), settings["text"], settings["layer"]
    options = {"special_keys": settings.get("special_keys", False), "exclude_bos": settings.get("exclude_bos", True)}
    arguments = (*keys, text, pattern_layers_for(loaded, text, layer), layer, settings["exclude"])
    query, bad_query = settings.get("query"), None
    if result_key(*arguments, query, **options) in result_cache():  # analysed already: no status box, no sleeps
        result = get_result(*arguments, query, **options)
    else:
        with slot.status(f"Analysing the text with {plain(loaded.info.id)}…", expanded=False) as status:
            try:
                result = get_result(*arguments, query, **options)
            except HeadscopeError as exc:
                if query is None or not str(exc).startswith("Query position"):
                    raise
                bad_query = f"{exc} The default query token is shown instead."  # e.g. a link's ?query=
                show_query(None)
                result = get_result(*arguments, None, **options)
            status.update(label=f"Analysed {result.n_tokens} tokens with {plain(loaded.info.id)}", state="complete")
    slot.empty()  # the model line below says what was analysed
    if bad_query:
        st.error(plain(bad_query))
    return result


def results_document(result: AnalysisResult, head: int, probe: AnalysisResult | None = None) -> dict:
    """The JSON download: the results with their provenance and, with the probe on, its results under "probe", as
    --json beside --with-probe writes them and --from-report reads them back out of the downloaded report."""
    doc = results_json(result, head)
    return doc if probe is None else with_probe_results(doc, probe)


def model_line_ui(result: AnalysisResult, info: ModelInfo, layer: int, head: int,
                  probe: AnalysisResult | None = None) -> None:
    kv = f", {info.n_kv_heads} key heads" if info.n_kv_heads != info.n_heads else ""
    err = result.layers[layer].parity_max_abs_err
    text, json_button, html_button = st.columns([8, 1, 1], vertical_alignment="center")
    text.markdown(f"**{plain(info.id)}**: {info.family}, {info.n_layers} layers × {info.n_heads} heads{kv}, "
                  f"{info.dtype} on {info.device}. {plain(info.reason)}")
    if layer in result_parity_failures(result):  # not the quiet caption: these figures may not be the model's
        text.warning(PARITY_FAILED_BOX.format(layer=layer, err=err, dtype=info.dtype, allowed=describe_tolerance(
            info.dtype, result.layers[layer].parity_score_max)))
    else:
        text.caption(f"Parity: the pattern rebuilt from the captured q and k matches the model's own attention "
                     f"{f'to {err:.0e}' if err else 'exactly'} (largest absolute difference over layer {layer}'s "
                     f"heads: {err:.1e}).")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info.id).strip("-")
    json_button.download_button("JSON", lambda: json.dumps(results_document(result, head, probe)),  # + provenance
                                file_name=f"headscope-{slug}-L{layer}.json", mime="application/json",
                                on_click="ignore",
                                help="Download the results (JSON" + (", with the induction probe)" if probe else ")"))
    # rendered only when clicked: the same function, hence the same bytes (apart from the time), as --html; with
    # the probe on, its atlases are a section of the report
    html_button.download_button("Report", lambda: render_report(result, head=head, probe=probe), mime="text/html",
                                file_name=f"headscope-{slug}-L{layer}.html", on_click="ignore",
                                help="Download the HTML report" + (" (with the induction probe)" if probe else ""))
    if needs_text_file(result.text):  # the report's reproduce command reads such a text from this file
        text.download_button("Download the text (report.text.txt)", result.text.encode("utf-8"),
                             file_name="report.text.txt", mime="text/plain", on_click="ignore")
    for warning in result.warnings:
        st.warning(plain(warning))


def show_query(query: int | None) -> None:
    """Make `query` (None: the default) the applied query token."""
    st.session_state[APPLIED] = {**st.session_state[APPLIED], "query": query}
    st.session_state[DEFAULTS][QUERY] = query


def tokens_ui(result: AnalysisResult) -> None:
    """The token strip: one pill per token; clicking one makes it the query token (no new forward pass)."""
    special = set(result.special_positions)
    first = literal(display_token(result.tokens[0])) + (" (a special token)" if 0 in special else "")
    effect = ("is left out of the Q/K statistics and the dot products" if result.exclude_first_token
              else "is included in the Q/K statistics and the dot products")
    bos = ("left out of the head scores (exclude BOS)" if result.bos_excluded else
           "kept in the head scores" + (" (not a special token)" if result.exclude_bos else " (exclude BOS off)"))
    keys = ("earlier tokens" if result.causal else "every other token") + (
        ", special tokens left out" if result.exclude_special_keys else "")
    query = (f"query token {result.query} {literal(display_token(result.query_token))} ({plain(result.query_choice)}), "
             f"compared with {keys}")
    st.markdown(f"**Tokens** ({result.n_tokens}; subscripts are positions, special tokens marked ◆). The first "
                f"token is {first} at position 0; with the current setting it {effect}, and it is {bos}. The figures "
                f"use the {query}: click a token to choose another.",
                help="Click a token to make it the query token; click it again for the default.")
    strip = st.container(height=110 if result.n_tokens > 90 else "content", border=False)
    text_id = f"{result.model['id']}\0{result.text}".encode("utf-8", "surrogatepass")
    # a new text or model, or a fresh text box (a preset; Back or Forward): a fresh strip, from the applied query
    key = f"query-{hashlib.sha256(text_id).hexdigest()[:16]}-{st.session_state[TEXT_VERSION]}"
    # unique labels (Streamlit tells options apart by their labels): the position as subscript digits
    labels = [plain(display_token(token)) + str(pos).translate(SUBSCRIPTS) + ("◆" if pos in special else "")
              for pos, token in enumerate(result.tokens)]
    strip.pills("Query token", list(range(result.n_tokens)), selection_mode="single", default=result.query,
                format_func=labels.__getitem__, key=key, on_change=choose_query, args=(key,),
                label_visibility="collapsed")


def probe_ui(settings: dict) -> AnalysisResult | None:
    """The induction probe's results when "Run the induction probe" is on (None when off, or failed: said why)."""
    if not st.session_state.get(PROBE, st.session_state[DEFAULTS][PROBE]):  # before its checkbox: its last value
        return None
    try:
        with st.spinner("Running the induction probe…"):
            return get_probe(settings["model"], settings["device"], settings["dtype"], settings["exclude"],
                             settings.get("exclude_bos", True))
    except Exception as exc:  # noqa: BLE001 (shown as a sentence, logged when unexpected)
        error_ui(exc, "induction probe")
    return None


def atlas_ui(result: AnalysisResult, settings: dict, probe: AnalysisResult | None = None) -> None:
    sources = {"text": result} if probe is None else {"text": result, "probe": probe}
    score_box, probe_box = st.columns([1, 1], vertical_alignment="bottom")
    probe_box.checkbox("Run the induction probe", key=PROBE, on_change=probe_toggled,
                       help="Analyse a seeded random token sequence written twice (once per model, then cached): on "
                            "it, induction scores mean something whatever your text repeats. The report then "
                            "carries its atlases too.", value=st.session_state[DEFAULTS][PROBE])
    options = [f"{source}:{score}" for source, found in sources.items() for score in found.head_scores]
    if not options:
        return
    if st.session_state.get(ATLAS_SCORE) not in options:
        st.session_state[ATLAS_SCORE] = options[0]
    label = lambda option: SCORE_TITLES.get(option.split(":")[1], option) + (
        " (induction probe)" if option.startswith("probe:") else " (your text)")
    choice = score_box.selectbox("Head atlas: score", options, format_func=label, key=ATLAS_SCORE)
    source, score = choice.split(":")
    layer, head = settings["layer"], settings["head"]
    # what the atlas's numbers depend on (the results of every layer of one text share them), as plain values
    scores = (choice, settings["model"], settings["device"], settings["dtype"], settings["exclude"],
              settings.get("exclude_bos", True), settings["text"] if source == "text" else None)
    outlined, key = atlas_outline(scores, layer, head)

    def atlas(selected: tuple[int, int] = (layer, head)) -> alt.TopLevelMixin:
        return fit_title(build_atlas_chart(sources[source], score, selected=selected), sources[source].model["id"], 60)

    spec = vega_spec(spec_cache().get(("atlas", scores, *outlined), lambda: frozen_spec(padded(atlas(outlined)))))
    st.vega_lite_chart(spec, key=key, on_select=lambda: select_head(key), selection_mode=ATLAS_SELECTION,
                       width="content")
    figure_downloads_ui(atlas, "atlas", sources[source].model["id"], figure_name(f"atlas_{score}"))
    st.caption(SCORE_EXPLANATIONS.get(score, "") + " Click a cell to show that head's pattern and its layer's figures.")


def atlas_outline(scores: tuple, layer: int, head: int) -> tuple[tuple[int, int], str]:
    """The head the atlas chart is sent outlined, (layer, head) except after a click on the atlas itself, and the
    chart's key (a new key is a new chart, its selection starting at the outline).

    A click outlines the clicked cell in the browser already; sending the chart again, outlined there, would only
    redraw it (a Vega compile and render on every click). So while the atlas shows the `scores` last sent and the
    browser outlines the shown head, the chart goes out unchanged. When the browser outlines a clicked cell that is
    no longer the shown head (another head from the sidebar, or Back), the chart goes out under another key: the
    same key and spec would leave the browser's outline where it is.
    """
    drawn, shown = st.session_state.get(ATLAS_DRAWN), (layer, head)
    key = f"{ATLAS}-L{layer}H{head}"
    if drawn is not None:
        state = st.session_state.get(drawn[2])
        clicked = None if state is None else selected_head(state.selection)
        if drawn[0] == scores and (clicked or drawn[1]) == shown:
            return drawn[1], drawn[2]
        if key == drawn[2] and clicked not in (None, shown):
            key += "-again"
    st.session_state[ATLAS_DRAWN] = (scores, shown, key)
    return shown, key


def heatmap_ui(result: AnalysisResult, layer: int, head: int) -> None:
    positions = None
    if result.n_tokens > MAX_AXIS_CELLS:
        positions = st.slider("Heatmap window (token positions)", 0, result.n_tokens, (0, result.n_tokens),
                              key=f"window-{result.n_tokens}",
                              help=f"Narrow the window to {MAX_AXIS_CELLS} tokens or fewer to see single tokens.")
    if result.layers[layer].patterns is None:
        st.caption("The attention patterns were not kept for this text (see the warning above).")
        return

    def heatmap() -> alt.TopLevelMixin:
        chart = fit_title(build_heatmap_chart(result, layer, head, positions), result.model["id"], 60)
        side = min(chart.width, APP_HEATMAP_SIDE)
        return padded(chart.properties(width=side, height=side))

    st.vega_lite_chart(vega_spec(shared(result, ("heatmap", layer, head, positions), lambda: frozen_spec(heatmap()))),
                       width="content")
    figure_downloads_ui(lambda: build_heatmap_chart(result, layer, head, positions), "heatmap", result.model["id"],
                        figure_name("heatmap", layer, head))
    st.caption("Bright cells show which tokens each query reads: a bright first column is an attention sink, a bright "
               "line just below the diagonal a previous-token head.")


def figures_ui(result: AnalysisResult, layer: int, head: int) -> None:
    """The notebook's figures of the shown layer in tabs, two per row; only the open tab's charts are built."""
    st.markdown(f"**The notebook's figures, layer {layer}**")
    tabs = st.tabs(list(FIGURE_TABS), key=FIGURES, on_change="rerun")
    for tab, keys in zip(tabs, FIGURE_TABS.values()):
        if tab.open is False:
            continue
        with tab:
            for pair in range(0, len(keys), 2):
                for column, key in zip(st.columns(2, gap="medium"), keys[pair:pair + 2]):
                    with column:
                        figure_ui(result, layer, key)


def figure_ui(result: AnalysisResult, layer: int, key: str) -> None:
    """One of the notebook's figures (none of them depends on the head): built and converted once per layer."""
    def build() -> alt.TopLevelMixin:
        return build_layer_charts(result, layer, keys=(key,))[0].chart

    def make() -> tuple:
        item = build_layer_charts(result, layer, keys=(key,))[0]
        return frozen_spec(padded(fit_title(item.chart, result.model["id"], 70), "fit-x")), item.explanation

    frozen, explanation = shared(result, ("figure", layer, key), make)
    st.vega_lite_chart(vega_spec(frozen), width="stretch")
    figure_downloads_ui(build, key, result.model["id"], figure_name(key, layer))
    st.caption(explanation)


def results_ui(result: AnalysisResult, info: ModelInfo, settings: dict) -> None:
    layer, head = settings["layer"], settings["head"]
    probe = probe_ui(settings)
    model_line_ui(result, info, layer, head, probe)
    tokens_ui(result)
    left, right = st.columns([5, 6], gap="medium")
    with left:
        atlas_ui(result, settings, probe)
    with right:
        heatmap_ui(result, layer, head)
    figures_ui(result, layer, head)


def one_text_ui(settings: dict) -> None:
    slot, sidebar_drawn = st.empty(), False
    try:
        loaded = load(settings, slot)
        settings = st.session_state[APPLIED]  # with its layer resolved, so the sidebar shows it
        share_link(settings)  # now, not only at the end: the link is right while the charts are still drawing
        sidebar_ui()
        sidebar_drawn = True
        result = analyse(settings, loaded, slot)
    except HeadscopeError as exc:
        slot.error(plain(exc))  # in the status box's place: no "Loading…" left above the error
    except Exception as exc:
        log.exception("analysis failed")
        slot.error(plain(UNEXPECTED.format(kind=type(exc).__name__, message=exc)))
    else:
        st.session_state[LAST_GOOD] = (result, loaded.info, settings)
    if not sidebar_drawn:  # the model did not load: the sidebar still lets the user fix the settings
        sidebar_ui()
    if LAST_GOOD in st.session_state:
        result, info, good = st.session_state[LAST_GOOD]
        if good is not settings:
            st.caption("Showing the last successful analysis.")
        results_ui(result, info, good)


# ----------------------------------------------------------------------------------------- many texts


def corpus_ui(settings: dict) -> None:
    st.markdown(f"Means over a corpus with bootstrap confidence intervals: padded forward passes of up to {BATCH_SIZE} "
                "texts each (every text measured on its own positions), with the model, device, dtype and "
                "\"exclude first token\" of the sidebar.")
    upload = st.file_uploader(f"One text per line (.txt), or JSON Lines with a \"text\" field (.jsonl); up to "
                              f"{MAX_UPLOAD_TEXTS:,} texts and {MAX_UPLOAD_MB} MB", type=["txt", "jsonl"],
                              key=CORPUS_FILE, max_upload_size=MAX_UPLOAD_MB)
    if upload is not None and st.button("Analyse the corpus", key="corpus_run", type="primary"):
        try:
            if upload.size > MAX_UPLOAD_MB * 2**20:
                raise HeadscopeError(UPLOAD_TOO_LARGE.format(name=upload.name, size=upload.size / 2**20,
                                                             max=MAX_UPLOAD_MB))
            texts = parse_texts(upload.getvalue(), upload.name)  # a line that is not UTF-8 is that line's error
            if len(texts) > MAX_UPLOAD_TEXTS:
                raise HeadscopeError(TOO_MANY_TEXTS.format(name=upload.name, n=len(texts), max=MAX_UPLOAD_TEXTS))
            if not any(isinstance(text, str) for text in texts):  # nothing to analyse: refused, the last results stay
                raise unusable_upload(upload, texts[0])
            bar = st.progress(0.0, text=f"Analysing {len(texts)} texts…")
            corpus = analyze_corpus(
                get_model(settings["model"], settings["device"], settings["dtype"]), texts, settings["exclude"],
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} texts"))
            bar.empty()
            if not corpus.n_analysed:  # every text failed (too long, empty): refused too, the last results stay
                first = corpus.failures[0]
                raise HeadscopeError(NONE_ANALYSED.format(n=len(corpus.texts), name=upload.name, number=first.number,
                                                          error=first.error))
            data = upload.getvalue()  # what the page records it was computed from, as --batch's corpus.html does
            run = {"input": upload.name, "sha256": hashlib.sha256(data).hexdigest(),
                   "command": corpus_command(corpus, upload.name)}
            st.session_state[CORPUS], st.session_state[CORPUS_INPUT] = corpus, (upload.name, run)
        except Exception as exc:  # noqa: BLE001 - errors keep the last corpus results, if any, below them
            error_ui(exc, "corpus upload")
    corpus_folder_ui()
    if CORPUS in st.session_state:
        corpus_results_ui(st.session_state[CORPUS], *st.session_state[CORPUS_INPUT])


def corpus_folder_ui() -> None:
    """Open a results folder written by `python -m reports --batch FILE --results DIR` (local or Ray engine).

    Like a local checkpoint, only a folder under the operator's HEADSCOPE_MODEL_DIRS opens (check_app_dir).
    """
    from analysis.corpus_store import ResultsFolder, load_results  # pyarrow only; never Ray

    folder = st.text_input("…or open a results folder on this machine (python -m reports --batch FILE --results DIR)",
                           key=RESULTS_DIR, placeholder="/path/to/results")
    if folder.strip() and st.button("Open the results folder", key="corpus_open"):
        try:
            path = check_app_dir(folder.strip(), model_dirs())
            st.session_state[CORPUS], st.session_state[CORPUS_INPUT] = load_results(path), (
                str(path), None, ResultsFolder(path).read_manifest())  # its page lists the input and the runs
        except Exception as exc:  # noqa: BLE001 (shown as a sentence, logged when unexpected)
            error_ui(exc, "results folder")


def unusable_upload(upload, first_error: Exception) -> HeadscopeError:
    try:
        upload.getvalue().decode("utf-8")
    except UnicodeDecodeError as exc:
        return HeadscopeError(NOT_UTF8.format(name=upload.name, offset=exc.start))
    return HeadscopeError(NO_USABLE_TEXT.format(name=upload.name, error=first_error))


def corpus_results_ui(corpus: CorpusResult, source: str, run: dict | None, manifest: dict | None = None) -> None:
    """The corpus of `source` (an upload's name, or a results folder); `run`: the upload and the command that
    recomputes it, for the downloaded page (None for a folder: as --from-results writes its page, with `manifest`,
    the folder's corpus.json, whose input and runs the page lists)."""
    st.caption(f"{literal(source)}: {corpus.n_analysed} of {len(corpus.texts)} texts analysed with "
               f"{plain(corpus.model['id'])}, one forward pass each; {corpus.level:.0%} percentile bootstrap "
               f"intervals over texts ({corpus.n_boot} resamples, seed {corpus.seed}).")  # a results folder's
    # manifest and an upload's name are user input: plain() and literal()
    if len(corpus.failures) > MAX_FAILURE_BOXES:  # one box, and a table as the CLI's index.html has
        st.warning(f"{len(corpus.failures):,} texts were skipped; each with its error:")
        st.dataframe([{"text": r.number, "excerpt": visible(r.excerpt), "error": visible(r.error)}
                      for r in corpus.failures], hide_index=True, height=240)
    else:
        for record in corpus.failures:
            st.warning(f"Text {record.number} was skipped: {plain(record.error)}")
    if corpus.score_definition == OLD_SCORE_DEFINITION:  # an encoder's folder from before 2026-12-07
        st.warning(OLD_SCORES_NOTE)
    chart, table = st.columns([1, 1], gap="medium")
    with chart:
        name = st.selectbox("Per-head number", list(corpus.values), format_func=lambda n: SCORE_TITLES.get(n, n),
                            key="corpus_score")
        chart = build_corpus_atlas_chart(corpus, name)
        chart.title.text = chart.title.text.split(" · ")[0]  # the caption above names the model
        st.altair_chart(padded(chart), width="content")
        st.caption(SCORE_EXPLANATIONS.get(name, ""))
    rows = [{"head": f"L{layer}H{head}", "mean": corpus.means[name][layer, head],
             "CI low": corpus.low[name][layer, head], "CI high": corpus.high[name][layer, head]}
            for layer in range(corpus.means[name].shape[0]) for head in range(corpus.means[name].shape[1])]
    with table:
        st.dataframe(rows, hide_index=True, height=360,
                     column_config={name: st.column_config.NumberColumn(format="%.4f") for name in
                                    ("mean", "CI low", "CI high")})
        st.download_button("Download the corpus report (HTML)",
                           lambda: render_corpus_report(corpus, run=run, manifest=manifest),
                           file_name="headscope-corpus.html", mime="text/html", on_click="ignore")



def figure_downloads_ui(build: Callable[[], alt.TopLevelMixin], key: str, model_id: str, stem: str) -> None:
    """PNG and SVG of build()'s chart, built and drawn for a paper by vl-convert (reports.figures) only when clicked.

    Streamlit's own chart toolbar offers a PNG only (its vega-embed menu, with SVG, is gone since 1.5x).
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model_id).strip("-")
    for column, fmt, mime in zip(st.columns(2, width=300), ("png", "svg"), ("image/png", "image/svg+xml")):
        column.download_button(f"{fmt.upper()}", lambda fmt=fmt: render_figure(build().to_dict(), key, fmt)[0],
                               file_name=f"headscope-{slug}-{stem}.{fmt}", mime=mime, on_click="ignore",
                               key=f"figure-{stem}-{fmt}", help=FIGURE_HELP.format(fmt=fmt.upper()))


def main() -> None:
    st.set_page_config(page_title="headscope", layout="wide")
    st.html(PAGE_CSS)
    init_state()
    for notice in st.session_state.get(LINK_NOTICES, []):
        st.warning(notice)
    one_text, many_texts, beyond = st.tabs(["One text", "Many texts (corpus)", "Beyond observation"])
    with one_text:
        one_text_ui(st.session_state[APPLIED])
    with many_texts:
        corpus_ui(st.session_state[APPLIED])
    with beyond:
        beyond_tab_ui()
    share_link(st.session_state[APPLIED])


# --- issue 15: ablation atlas, neuron view, two models (self-contained; called once, from main) ---

BEYOND_ABLATION, BEYOND_COMPARE = "beyond_ablation", "beyond_compare"  # session state: (inputs, result)
@st.cache_resource(max_entries=1, show_spinner=False)
def get_lm(model: str, device: str, dtype: str) -> LoadedModel:
    """The model with its LM head (the ablation's loss); without one in the checkpoint, lm is None."""
    return load_model(model, device, dtype, allowed_roots=model_dirs(), head=True)


@st.cache_resource(max_entries=1, show_spinner=False)
def get_model_b(model: str, revision: str | None, device: str, dtype: str, head: bool) -> LoadedModel:
    return load_model(model, device, dtype, allowed_roots=model_dirs(), head=head, revision=revision)


@st.cache_resource(max_entries=2, show_spinner=False)
def get_layer_capture(model: str, device: str, dtype: str, text: str, layer: int) -> Capture:
    """One pass keeping `layer`'s pattern, for the neuron view (immutable: a resource, not pickled per rerun)."""
    return capture(get_model(model, device, dtype), text, pattern_layers=[layer], keep_patterns=True)


def error_ui(exc: Exception, what: str) -> None:
    """A section's failure as one st.error: a HeadscopeError's sentence, or UNEXPECTED (logged with its traceback)."""
    if isinstance(exc, HeadscopeError):
        st.error(plain(exc))
    else:
        log.exception("%s failed", what)
        st.error(plain(UNEXPECTED.format(kind=type(exc).__name__, message=exc)))


def beyond_tab_ui() -> None:
    """Ablation, neuron view and two models, on the last successful analysis's model, text, layer and head."""
    if LAST_GOOD not in st.session_state:
        st.info("Analyse a text first (the One text tab): these views use its model, text, layer and head.")
        return
    good = st.session_state[LAST_GOOD][-1]
    beyond_ui(good, good["layer"], good["head"])


def beyond_ui(settings: dict, layer: int, head: int) -> None:
    from analysis.ablation import MODES

    st.subheader("Beyond observation")
    ablation_tab, neuron_tab, compare_tab = st.tabs(["Head ablation", "Neuron view", "Two models"])
    with ablation_tab:
        ablation_ui(settings, MODES)
    with neuron_tab:
        neuron_ui(settings, layer, head)
    with compare_tab:
        compare_ui(settings, layer)


def ablation_ui(settings: dict, modes: tuple[str, ...]) -> None:
    from analysis.ablation import compute_ablation
    from reports.charts import build_ablation_chart

    st.caption("Remove one head's output at a time (zero it, or replace it by its mean over the text's positions) "
               "and measure how much the model's loss on the text changes (or, without an LM head, such as the "
               "bundled MiniLM's, its final hidden states): all layers x heads, in batches.")
    mode_col, seed_col = st.columns(2)
    mode = mode_col.radio("Ablation", modes, horizontal=True, key="ablation_mode")
    seed = int(seed_col.number_input("Mask seed (a masked LM's 15% masked positions)", 0, 2**31 - 1, 0,
                                     key="ablation_seed"))
    inputs = (settings["model"], settings["device"], settings["dtype"], settings["text"], mode, seed)
    if not st.checkbox("Run the ablation atlas", key="ablation_run",
                       help="1 + L*H/16 forward passes of batched copies of the text; rerun when the inputs change."):
        return
    stored = st.session_state.get(BEYOND_ABLATION)
    if stored is None or stored[0] != inputs:
        try:
            bar = st.progress(0.0, text="Loading the model with its LM head…")
            loaded = get_lm(*inputs[:3])
            result = compute_ablation(loaded, settings["text"], mode, seed, progress=lambda done, total: bar.progress(
                done / total, text=f"Ablated batch {done} of {total}"))
            bar.empty()
            st.session_state[BEYOND_ABLATION] = (inputs, result)
        except Exception as exc:  # noqa: BLE001 (shown as a sentence, logged when unexpected)
            error_ui(exc, "beyond-observation section")
            return
    result = st.session_state[BEYOND_ABLATION][1]
    st.altair_chart(padded(build_ablation_chart(result, settings["model"])), width="content")
    order = np.argsort(-np.abs(result.delta), axis=None)[:10]  # [10] flat indices of the largest changes
    rows = [{"head": f"L{i // result.delta.shape[1]}H{i % result.delta.shape[1]}",
             "change": float(result.delta.flat[i])} for i in order]
    st.caption(f"The ten heads whose removal changes the {'loss' if result.is_loss else 'hidden states'} most:")
    st.dataframe(rows, hide_index=True)


def neuron_ui(settings: dict, layer: int, head: int) -> None:
    from analysis.neuron import neuron_view_from_capture
    from reports.charts import build_neuron_keys_chart, build_neuron_products_chart, build_neuron_vectors_chart

    st.caption(f"Head L{layer}H{head} (the sidebar's layer and head): one query token, one key token, dimension by "
               "dimension; the bars q_i × k_i sum to their unscaled dot product.")
    if not st.toggle("Show the neuron view", key="neuron_on"):
        return
    try:
        captured = get_layer_capture(settings["model"], settings["device"], settings["dtype"], settings["text"], layer)
        loaded = get_model(settings["model"], settings["device"], settings["dtype"])
        labels = [f"{i}: {display_token(t)}" for i, t in enumerate(captured.tokens)]
        query_col, key_col = st.columns(2)
        # first the analysis's own query token (an encoder's is its last word, not [SEP]; or the link's / strip's)
        first, _ = resolve_query(captured.special, loaded.info.causal, settings.get("query"))
        query = query_col.selectbox("Query token", range(len(labels)), index=first,
                                    format_func=labels.__getitem__, key="neuron_query")
        keys = [None, *range(len(labels))]
        key = key_col.selectbox("Key token", keys, key="neuron_key",
                                format_func=lambda k: "the most attended" if k is None else labels[k])
        view = neuron_view_from_capture(captured, layer, head, query, key, loaded.info.causal)
    except Exception as exc:  # noqa: BLE001
        error_ui(exc, "beyond-observation section")
        return
    for chart in (build_neuron_products_chart(view), build_neuron_vectors_chart(view), build_neuron_keys_chart(view)):
        st.altair_chart(padded(chart), width="content")


def compare_ui(settings: dict, layer: int) -> None:
    from analysis.compare import compare_models
    from reports.charts import (
        build_ablation_chart,
        build_compare_ablation_chart,
        build_compare_atlas_chart,
        build_compare_qk_chart,
    )

    st.caption("The same text through a second model with the same tokenizer (a fine-tune, another training "
               "checkpoint): both head atlases, their difference B − A, and the Q/K statistics side by side.")
    model_col, revision_col = st.columns([2, 1])
    model_b = model_col.text_input("Model B: hub id or local checkpoint path", key="compare_model",
                                   placeholder="e.g. EleutherAI/pythia-70m")
    revision = revision_col.text_input("Revision of B (hub ids)", key="compare_revision",
                                       placeholder="e.g. step1000").strip() or None
    mode = st.radio("Ablation atlases too", ["none", "zero", "mean"], horizontal=True, key="compare_ablation")
    ablation = None if mode == "none" else mode
    inputs = (settings["model"], settings["device"], settings["dtype"], settings["text"], model_b.strip(), revision,
              layer, ablation, settings["exclude"], settings.get("query"), settings["special_keys"],
              settings["exclude_bos"])
    if not st.checkbox("Compare", key="compare_run", disabled=not model_b.strip()):
        return
    stored = st.session_state.get(BEYOND_COMPARE)
    if stored is None or stored[0] != inputs:
        try:
            with st.spinner("Running both models…"):
                loaded_a = get_lm(*inputs[:3]) if ablation else get_model(*inputs[:3])
                loaded_b = get_model_b(model_b.strip(), revision, settings["device"], settings["dtype"],
                                       ablation is not None)
                result = compare_models(loaded_a, loaded_b, settings["text"], [layer], settings["exclude"], ablation,
                                        query_position=settings.get("query"),
                                        exclude_special_keys=settings["special_keys"],
                                        exclude_bos=settings["exclude_bos"])
            st.session_state[BEYOND_COMPARE] = (inputs, result)
        except Exception as exc:  # noqa: BLE001
            error_ui(exc, "beyond-observation section")
            return
    result = st.session_state[BEYOND_COMPARE][1]
    for warning in result.warnings:
        st.warning(plain(warning))
    score = st.selectbox("Score", list(result.a.head_scores), format_func=lambda n: SCORE_TITLES.get(n, n),
                         key="compare_score")
    columns = st.columns(3)
    for column, which in zip(columns, ("a", "b", "difference")):
        if which != "difference" or score in result.score_difference:
            with column:
                st.altair_chart(padded(build_compare_atlas_chart(result, score, which)), width="content")
    if result.ablation_difference is not None:
        st.altair_chart(padded(build_compare_ablation_chart(result)), width="content")
    elif result.ablation_a is not None:  # no difference (other shapes or measures): each model's atlas, as computed
        columns = st.columns(2)
        for column, side, atlas in zip(columns, (result.a, result.b), (result.ablation_a, result.ablation_b)):
            with column:
                st.altair_chart(padded(build_ablation_chart(atlas, side.model["id"])), width="content")
    st.caption(f"Layer {layer}: the notebook's Q/K statistics of both models, head by head.")
    columns = st.columns(2)
    for number, stat in enumerate(("q_means", "q_stds", "k_means", "k_stds")):
        with columns[number % 2]:
            st.altair_chart(padded(build_compare_qk_chart(result, layer, stat)), width="content")


main()
