"""The head atlas: a layers x heads chart of one score, deterministic, with a named point selection."""

from __future__ import annotations

import json
import re

import pytest
from markupsafe import escape

from analysis import analyze
from analysis.corpus import CorpusAccumulator
from analysis.results import HEAD_SCORE_NAMES
from reports.charts import (
    ATLAS_SELECTION,
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_atlas_chart,
    build_corpus_atlas_chart,
    selected_head,
)
from tests.conftest import REPEATS


@pytest.fixture(scope="module")
def result(gpt2):
    return analyze(gpt2, REPEATS, layers=[6])


def rows(spec: dict) -> list[dict]:
    (data,) = spec["datasets"].values()
    return data


@pytest.mark.parametrize("score", HEAD_SCORE_NAMES)
def test_the_atlas_holds_every_heads_score(result, score):
    spec = build_atlas_chart(result, score).to_dict()
    data = rows(spec)
    scores = result.head_scores[score]  # [layer, head]
    assert len(data) == scores.size == 8 * 12
    for row in data:
        assert row["value"] == pytest.approx(scores[row["layer"], row["head"]], rel=1e-5, abs=1e-12)
    assert {"calculate": "'L' + datum.layer + 'H' + datum.head", "as": "label"} in spec["layer"][0]["transform"]
    assert [param["name"] for param in spec["params"]] == [ATLAS_SELECTION]
    assert spec["params"][0]["select"]["fields"] == ["layer", "head"]
    tooltip = json.dumps(spec["layer"][1]["encoding"]["tooltip"])
    assert '"label"' in tooltip and '"value"' in tooltip


def test_the_same_results_give_the_same_spec_bytes(result):
    first = json.dumps(build_atlas_chart(result, "induction").to_dict())
    build_atlas_chart(result, "sink").to_dict()  # other charts in between must not renumber anything
    assert json.dumps(build_atlas_chart(result, "induction").to_dict()) == first


def test_undefined_scores_are_missing_cells(gpt2):
    # one token, its own attention excluded: nothing to measure (exclude_bos keeps a first word)
    one = analyze(gpt2, "a", layers=[6], exclude_current_token=True)
    spec = build_atlas_chart(one, "previous_token").to_dict()
    assert len(rows(spec)) == 8 * 12 and all(row["value"] is None for row in rows(spec))
    assert {"filter": "isValid(datum.value)"} in spec["layer"][1]["transform"]  # coloured only where defined
    with pytest.raises(KeyError):
        build_atlas_chart(one, "no_such_score")


def test_the_corpus_atlas_holds_means_and_intervals(gpt2):
    from analysis.capture import capture

    acc = CorpusAccumulator(gpt2.info.to_dict())
    for text in ("the cat sat", "a dog ran home", "the mat"):
        acc.add(capture(gpt2, text, pattern_layers=[]))
    corpus = acc.finish(n_boot=50)
    spec = build_corpus_atlas_chart(corpus, "sink").to_dict()
    for row in rows(spec):
        layer, head = row["layer"], row["head"]
        assert row["value"] == pytest.approx(corpus.means["sink"][layer, head], rel=1e-5)
        assert row["low"] == pytest.approx(corpus.low["sink"][layer, head], rel=1e-5)
        assert row["high"] == pytest.approx(corpus.high["sink"][layer, head], rel=1e-5)
        assert row["n"] == 3
    assert "mean over 3 texts" in spec["title"]["text"]


def test_selected_head_reads_streamlits_selection_state():
    assert selected_head({ATLAS_SELECTION: [{"layer": 3, "head": 5}]}) == (3, 5)
    assert selected_head({ATLAS_SELECTION: [{"layer": 1, "head": 0}, {"layer": 2, "head": 7}]}) == (2, 7)  # shift-click
    assert selected_head({ATLAS_SELECTION: [{"layer": 2.0, "head": "4"}]}) == (2, 4)
    for empty in (None, {}, {ATLAS_SELECTION: {}}, {ATLAS_SELECTION: []}, {"other": [{"layer": 1, "head": 1}]},
                  {ATLAS_SELECTION: [{"head": 1}]}):
        assert selected_head(empty) is None


def test_the_report_has_an_atlas_per_score_before_the_layers_and_the_centred_statistics(gpt2, result):
    from reports.html import render_report

    page = render_report(result, head=2)
    atlas, first_layer = page.index('<section id="atlas">'), page.index('<section id="layer-6">')
    assert atlas < page.index('<section id="same-vs-different">') < first_layer
    for score in HEAD_SCORE_NAMES:
        assert page.count(f'data-chart="chart-atlas-{score}"') == 1
    for score in HEAD_SCORE_NAMES:  # its own explanation under its heading, escaped as Jinja does
        block = page[page.index(f'<div class="chart" id="atlas-{score}">'):]
        block = block[:block.index("</div>")]
        assert f"<h3>{escape(SCORE_TITLES[score])}</h3>" in block
        assert f"<p>{escape(SCORE_EXPLANATIONS[score])}</p>" in block
    # readable without JavaScript: every score of every head is in a table
    scores = result.head_scores["induction"]
    table = page[page.index('id="atlas-induction"'):page.index('id="atlas-sink"')]
    assert len(re.findall(r'<th class="label">L\d+</th>', table)) == 8 and f"<td>{scores[6, 3]:.4g}</td>" in table
    stats = page[page.index('<section id="same-vs-different">'):first_layer]
    assert "adding a constant to every key" in stats and "softmax ignores it" in stats
    dp = result.layers[6].dp_stats
    assert f"{dp.rank_biserial_centered:.4g}" in stats
    assert abs(dp.same_head_dp_centered.mean()) < 1e-9 and "<td>0</td>" in stats  # centred: 0 up to rounding, shown 0


def test_an_induction_probe_report_says_so(gpt2):
    from analysis import analyze_induction_probe
    from reports.html import render_report

    page = render_report(analyze_induction_probe(gpt2, length=20, seed=3, layers=[6]))
    assert "on the induction probe (20 random tokens written twice, seed 3)" in page
