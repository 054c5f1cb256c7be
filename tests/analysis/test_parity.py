"""Parity that can fail (issue 12, item 3), and warnings that are true (item 6).

A wrong scaling in headscope's rebuild of the pattern (the model's own attention is untouched) must show up in
all four places: the result's warnings (hence the JSON), the CLI's stderr, the top of the report, and the app,
which then shows a warning instead of its green parity box.
"""

from __future__ import annotations

import importlib
import json
import re

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from analysis import analyze, load_model
from analysis.parity import (
    PARITY_CAP,
    PARITY_ROUNDOFF,
    PARITY_TOLERANCE,
    describe_tolerance,
    parity_failures,
    parity_tolerance,
    parity_warning,
    result_parity_failures,
)
from analysis.presets import FIJI
from analysis.results import AnalysisResult
from analysis.schema import validate_results
from reports.__main__ import main
from reports.html import render_report
from tests.app.test_app import APP, TIMEOUT
from tests.checkpoints import tiny_llama

capture_module = importlib.import_module("analysis.capture")  # the attribute analysis.capture is the function
TEXT = "The cat sat on the mat. The cat sat on the mat again."
LOUD = 2.5  # the loud Llama's q and k projections, times this: its scores 6.25 times the tiny Llama's (FIJI: up to ~75)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def llama(llama_path):
    return load_model(str(llama_path))


def scaled_llama(llama_path, factor: float):
    """The tiny Llama run in bfloat16 with its q and k projections times `factor`: scores factor² times as large."""
    loaded = load_model(str(llama_path), dtype="bfloat16")
    with torch.no_grad():
        for layer in loaded.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return loaded


@pytest.fixture(scope="module")
def loud_llama(llama_path):
    """The tiny Llama run in bfloat16 with large scores: its q and k projections scaled by LOUD."""
    return scaled_llama(llama_path, LOUD)


@pytest.fixture(scope="module")
def bert(bert_path):
    return load_model(str(bert_path))


@pytest.fixture(scope="module")
def bundled():
    return load_model("minilm")


def wrong_rebuild(monkeypatch, change, calls: set[int] | None = None) -> None:
    """headscope rebuilds the pattern from change(q, k, scaling, mask) -> (q, k, scaling, mask) instead of the
    model's own, on the given calls (0-based; None: all): one call per analysed layer, each its own group
    (capture.GROUP_BUDGET of 1 byte) of one block of query rows."""
    monkeypatch.setitem(capture_module.GROUP_BUDGET, "cpu", 1)
    real = capture_module.compute_pattern
    count = iter(range(10**6))

    def rebuild(q, k, scaling, mask=None, *args, **kwargs):
        if calls is None or next(count) in calls:
            q, k, scaling, mask = change(q, k, scaling, mask)
        return real(q, k, scaling, mask, *args, **kwargs)

    monkeypatch.setattr(capture_module, "compute_pattern", rebuild)


def wrong_scaling(monkeypatch, calls: set[int] | None = None, factor: float = 2.0) -> None:
    """headscope rebuilds the pattern with `factor` times the model's scaling (wrong_rebuild)."""
    wrong_rebuild(monkeypatch, lambda q, k, scaling, mask: (q, k, scaling * factor, mask), calls)


WRONG_REBUILDS = {  # what a rebuild that is not the model's could get wrong
    "half the scale": lambda q, k, scaling, mask: (q, k, scaling / 2, mask),
    "no mask": lambda q, k, scaling, mask: (q, k, scaling, None),
    "the wrong key heads": lambda q, k, scaling, mask: (q, k.roll(1, dims=0), scaling, mask),  # [kv_head, pos, d]
}


def test_tolerance_and_warning_name_the_failing_layers():
    assert PARITY_TOLERANCE["float32"] < PARITY_TOLERANCE["float16"] < PARITY_TOLERANCE["bfloat16"]
    errors = {0: 0.0, 2: 2e-5, 5: 1e-6, 7: float("nan")}
    assert parity_failures(errors, "float32") == {2: 2e-5, 7: pytest.approx(float("nan"), nan_ok=True)}
    assert parity_failures(errors | {7: 0.0}, "bfloat16") == {}
    assert parity_warning({0: 0.0}, "float32") is None
    assert "layers 2, 7:" in parity_warning(errors, "float32")


def test_half_precision_tolerance_grows_with_the_layers_largest_score():
    """float32, and a layer without its largest score (a document written before it was recorded): the dtype's
    absolute bound. Half precision: that bound plus the dtype's unit roundoff times the largest score."""
    for dtype, base in PARITY_TOLERANCE.items():
        assert parity_tolerance(dtype) == parity_tolerance(dtype, None) == parity_tolerance(dtype, float("nan")) == base
    assert parity_tolerance("float32", 1e4) == PARITY_TOLERANCE["float32"]
    for dtype, u in PARITY_ROUNDOFF.items():
        assert parity_tolerance(dtype, 40.0) == pytest.approx(PARITY_TOLERANCE[dtype] + 40.0 * u)
    errors, scores = {0: 0.1, 1: 0.1, 2: 0.5}, {0: 40.0, 1: None, 2: 40.0}  # bfloat16: 0.03 + 40/256 = 0.186
    assert parity_failures(errors, "bfloat16", scores) == {1: 0.1, 2: 0.5}
    assert parity_failures(errors, "bfloat16") == errors  # the absolute bound alone
    warning = parity_warning(errors, "bfloat16", scores)
    assert (f"allowed for bfloat16: layer 1: {PARITY_TOLERANCE['bfloat16']:.1e}; "
            f"layer 2: {describe_tolerance('bfloat16', 40.0)})") in warning  # each layer's own, stated
    assert "largest score 40" in describe_tolerance("bfloat16", 40.0)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bfloat16_with_large_scores_passes_exactly_and_a_wrong_rebuild_still_fails(loud_llama, monkeypatch,
                                                                                    attention):
    """bfloat16 rounds each of the model's scores by up to |score| 2^-8 (twice), so a model with large scores differs
    from headscope's exact float32 rebuild by more than the absolute 3e-2 (eager: the model's own weights); the
    tolerance that grows with the layer's largest score passes it, and a rebuild that is not the model's (half the
    scale, no mask, the wrong key heads) still fails on that layer alone, its warning stating the tolerance."""
    honest = analyze(loud_llama, FIJI, attention=attention)
    assert honest.model["dtype"] == "bfloat16"
    errors = {layer: data.parity_max_abs_err for layer, data in honest.layers.items()}
    if attention == "eager":
        assert all(layer.parity_score_max > 40 for layer in honest.layers.values())  # |score| 2^-8 > 0.15
        assert parity_failures(errors, "bfloat16")  # the absolute bound alone warned on an exact rebuild
    else:  # the fused kernel keeps its scores in float32: its output is held to the absolute bound
        assert all(layer.parity_score_max is None for layer in honest.layers.values())
    assert not result_parity_failures(honest)
    assert not any("Parity" in warning for warning in honest.warnings)
    for name, change in WRONG_REBUILDS.items():
        with monkeypatch.context() as patch:
            wrong_rebuild(patch, change, calls={1})  # the second analysed layer, 1
            broken = analyze(loud_llama, FIJI, attention=attention)
        assert list(result_parity_failures(broken)) == [1], name
        (warning,) = [w for w in broken.warnings if "Parity" in w]
        allowed = describe_tolerance("bfloat16", broken.layers[1].parity_score_max)
        assert "on layer 1:" in warning and f"(allowed for bfloat16: {allowed})" in warning
    page = render_report(broken)  # the last one: its top and its layer say what was allowed
    assert page.count(f"more than allowed for bfloat16 ({allowed})") == 2


@pytest.fixture(scope="module")
def louder_llama(llama_path):
    """The tiny Llama in bfloat16 with q and k projections times 8: scores of 500 to 1000 on FIJI."""
    return scaled_llama(llama_path, 8.0)


def test_the_bound_stops_growing_at_the_cap_so_huge_scores_still_catch_a_lost_mask(louder_llama, monkeypatch):
    """Scores of several hundred would let u * score_max pass 1 (more than any weight can differ), so a rebuild
    without the mask passed parity silently: the bound stops at PARITY_CAP, and the message says it was capped.
    The fused kernel's route is held to the absolute bound, so there a wrong scale fails as well."""
    assert parity_tolerance("bfloat16", 1e4) == PARITY_CAP and parity_tolerance("float32", 1e4) < PARITY_CAP
    assert "the most a check allows" in describe_tolerance("bfloat16", 1e4) and "float32" in describe_tolerance(
        "bfloat16", 1e4)
    honest = analyze(louder_llama, FIJI, attention="eager")
    assert all(layer.parity_score_max > 256 for layer in honest.layers.values())  # uncapped: a bound past 1
    assert not result_parity_failures(honest)  # the model's own rounding stays under the cap
    for attention, changes in (("eager", ["no mask"]), ("sdpa", ["no mask", "half the scale"])):
        for name in changes:
            with monkeypatch.context() as patch:
                wrong_rebuild(patch, WRONG_REBUILDS[name], calls={1})
                broken = analyze(louder_llama, FIJI, attention=attention)
            assert list(result_parity_failures(broken)) == [1], (attention, name)
    (warning,) = [w for w in broken.warnings if "Parity" in w]
    assert "on layer 1:" in warning


def test_results_without_the_largest_score_load_and_are_held_to_the_absolute_bound(loud_llama, llama):
    """The JSON carries each half-precision layer's largest score (schema-valid, read back), a float32 one none; a
    document written before it was recorded still loads, its layers then held to the dtype's absolute bound."""
    plain = analyze(llama, TEXT, [0])  # float32: the absolute bound, nothing to scale it with
    assert plain.layers[0].parity_score_max is None and "parity_score_max" not in plain.to_dict()["layers"]["0"]
    result = analyze(loud_llama, FIJI)  # eager, whose error exceeds the absolute bound (test above)
    data = validate_results(json.loads(json.dumps(result.to_dict())))
    again = AnalysisResult.from_dict(data)
    assert {layer: data.parity_score_max for layer, data in again.layers.items()} == pytest.approx(
        {layer: data.parity_score_max for layer, data in result.layers.items()})
    assert not result_parity_failures(again)
    for layer in data["layers"].values():
        del layer["parity_score_max"]
    old = AnalysisResult.from_dict(validate_results(data))
    assert all(layer.parity_score_max is None for layer in old.layers.values())
    assert result_parity_failures(old) == parity_failures(
        {layer: data.parity_max_abs_err for layer, data in old.layers.items()}, "bfloat16") != {}


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "bundled"])
def test_true_parity_passes_and_a_wrong_scaling_fails_on_that_layer_alone(name, request, monkeypatch):
    loaded = request.getfixturevalue(name)
    layers = [0, 1]
    honest = analyze(loaded, TEXT, layers)
    assert not any("Parity" in warning for warning in honest.warnings)
    wrong_scaling(monkeypatch, calls={1})  # the second analysed layer, 1
    broken = analyze(loaded, TEXT, layers)
    assert broken.layers[0].parity_max_abs_err <= PARITY_TOLERANCE["float32"]
    assert broken.layers[1].parity_max_abs_err > PARITY_TOLERANCE["float32"]
    (warning,) = [w for w in broken.warnings if "Parity" in w]
    assert "on layer 1:" in warning and "float32" in warning
    assert broken.to_dict()["warnings"] == list(broken.warnings)


@pytest.mark.parametrize("v_scale", [30.0, 1e-6])
def test_parity_against_the_fused_kernels_output_does_not_depend_on_the_size_of_v(llama, monkeypatch, v_scale):
    """On sdpa's route (every GPU run) parity compares the rebuilt pattern times v with the kernel's output. Scaling
    the value projection changes no attention weight: an exact rebuild still passes, a wrong one still fails (in
    v's units, large values warned on an exact rebuild and small ones hid a wrong one)."""
    import torch

    weights = [layer.self_attn.v_proj.weight for layer in llama.model.layers]
    saved = [weight.detach().clone() for weight in weights]
    try:
        with torch.no_grad():
            for weight in weights:
                weight.mul_(v_scale)
        honest = analyze(llama, TEXT, [0, 1], attention="sdpa")
        assert all(data.parity_max_abs_err <= PARITY_TOLERANCE["float32"] for data in honest.layers.values())
        assert not any("Parity" in warning for warning in honest.warnings)
        wrong_scaling(monkeypatch, calls={1})
        broken = analyze(llama, TEXT, [0, 1], attention="sdpa")
        assert broken.layers[1].parity_max_abs_err > 100 * PARITY_TOLERANCE["float32"]
        assert any("on layer 1:" in warning for warning in broken.warnings)
    finally:
        with torch.no_grad():
            for weight, value in zip(weights, saved):
                weight.copy_(value)


def _leaves(value, path=""):
    """(path, number) of every number in a results dict, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _leaves(value[key], f"{path}/{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, float(value)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_layers_measured_as_one_stack_give_each_layers_own_numbers(name, request, monkeypatch):
    """capture.GROUP_BUDGET only decides how many layers share one set of operations: one layer a group and every
    layer in one group give the same result, parity per layer included."""
    loaded = request.getfixturevalue(name)
    monkeypatch.setitem(capture_module.GROUP_BUDGET, "cpu", 1)
    alone = analyze(loaded, TEXT).to_dict()
    monkeypatch.setitem(capture_module.GROUP_BUDGET, "cpu", 2**40)
    monkeypatch.setitem(capture_module.HOLD_BUDGET, "cpu", 2**40)
    stacked = analyze(loaded, TEXT).to_dict()
    expected, found = list(_leaves(alone)), list(_leaves(stacked))
    assert [path for path, _ in found] == [path for path, _ in expected]
    assert len(expected) > 1000  # every layer's numbers, not an empty result
    for (path, want), (_, got) in zip(expected, found):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True), path


def test_cli_report_and_json_say_so(gpt2_path, tmp_path, capsys, monkeypatch):
    wrong_scaling(monkeypatch, calls={1})  # layers 2 and 5: the second one, 5, fails
    out, page_path = tmp_path / "out.json", tmp_path / "out.html"
    code = main(["--model", str(gpt2_path), "--text", TEXT, "--layer", "2", "--layer", "5", "--json", str(out),
                 "--html", str(page_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert re.search(r"^headscope: warning: Parity check failed on layer 5: ", err, re.MULTILINE), err
    (warning,) = [w for w in json.loads(out.read_text())["warnings"] if "Parity" in w]
    assert warning.startswith("Parity check failed on layer 5: ") and f"headscope: warning: {warning}" in err
    page = page_path.read_text()
    top = page.index('id="parity-failed"')
    assert top < page.index('id="provenance"') < page.index('id="layer-2"')  # at the top, before everything
    paragraph = re.sub(r"\s+", " ", page[top:page.index("</p>", top)])
    assert "Parity failed: on layer 5 the attention" in paragraph and "float32" in paragraph
    top_of_page = page[page.index("</noscript>"):page.index('id="provenance"')]  # one box says it, not the
    # result's warning beside it
    assert top_of_page.count('class="warning"') == 1 and "Parity check failed" not in top_of_page
    layer2, layer5 = page[page.index('id="layer-2"'):page.index('id="layer-5"')], page[page.index('id="layer-5"'):]
    assert "Parity failed" not in layer2 and "matches the model's own attention" in layer2
    assert "Parity failed" in layer5.split("<div class=\"chart\">")[0]


def test_report_of_an_honest_result_has_no_parity_warning(gpt2):
    page = render_report(analyze(gpt2, TEXT, [2]))
    assert "Parity failed" not in page and 'id="parity-failed"' not in page


def run_minilm_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = "minilm"  # not auto: with gpt2 in the cache, auto is GPT-2
    return at.run()


def test_app_shows_a_warning_instead_of_the_parity_caption(monkeypatch):
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        honest = run_minilm_app()  # layer 3, the middle one
        assert not honest.exception
        assert any(box.value.startswith("Parity:") for box in honest.caption)  # the quiet line of a pass
        assert not any("Parity" in box.value for box in honest.warning)
        st.cache_data.clear()
        st.cache_resource.clear()
        wrong_scaling(monkeypatch)
        broken = run_minilm_app()
        assert not broken.exception
        assert not any(box.value.startswith("Parity:") for box in broken.caption)
        texts = [box.value for box in broken.warning]
        assert any(text.startswith("Parity failed on layer 3:") for text in texts), texts
        assert any(text.startswith("Parity check failed on layer 3:") for text in texts), texts  # result.warnings
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()


# --- item 6: the patterns-dropped warning only when patterns were wanted and could not be kept ---

def test_plain_json_run_warns_about_nothing(gpt2_path, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["--model", str(gpt2_path), "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "not kept" not in err
    assert json.loads(out.read_text())["warnings"] == []


def test_patterns_asked_for_are_kept_beyond_the_budget(gpt2_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(capture_module, "PATTERN_BUDGET", 1024)  # bytes: smaller than any pattern here
    out = tmp_path / "out.json"
    assert main(["--model", str(gpt2_path), "--layer", "6", "--patterns", "--json", str(out)]) == 0
    assert "not kept" not in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["warnings"] == [] and len(data["layers"]["6"]["patterns"]) == 12


def test_patterns_dropped_names_the_cli_flags(gpt2, monkeypatch):
    monkeypatch.setattr(capture_module, "PATTERN_BUDGET", 1024)
    reduced = analyze(gpt2, FIJI, layers=[6])  # keep_patterns=None: kept if they fit, and they do not
    (warning,) = [w for w in reduced.warnings if "not kept" in w]
    assert "--patterns" in warning and "--html" in warning and "keep_patterns" not in warning
    assert not [w for w in analyze(gpt2, FIJI, layers=[6], keep_patterns=False).warnings if "not kept" in w]
