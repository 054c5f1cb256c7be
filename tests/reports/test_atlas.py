"""The head atlas: a layers x heads chart of one score, deterministic, with a named point selection."""

from __future__ import annotations

import json

import pytest

from analysis import analyze
from analysis.corpus import CorpusAccumulator
from analysis.results import HEAD_SCORE_NAMES
from reports.charts import ATLAS_SELECTION, build_atlas_chart, build_corpus_atlas_chart, selected_head
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
        assert row["label"] == f"L{row['layer']}H{row['head']}"
        assert row["value"] == pytest.approx(scores[row["layer"], row["head"]], rel=1e-12)
    assert [param["name"] for param in spec["params"]] == [ATLAS_SELECTION]
    assert spec["params"][0]["select"]["fields"] == ["layer", "head"]
    tooltip = json.dumps(spec["layer"][1]["encoding"]["tooltip"])
    assert '"label"' in tooltip and '"value"' in tooltip


def test_the_same_results_give_the_same_spec_bytes(result):
    first = json.dumps(build_atlas_chart(result, "induction").to_dict())
    build_atlas_chart(result, "sink").to_dict()  # other charts in between must not renumber anything
    assert json.dumps(build_atlas_chart(result, "induction").to_dict()) == first


def test_undefined_scores_are_missing_cells(gpt2):
    one = analyze(gpt2, "a", layers=[6])  # one token: nothing to measure with the first token excluded
    spec = build_atlas_chart(one, "previous_token").to_dict()
    assert len(rows(spec)) == 8 * 12 and all(row["value"] is None for row in rows(spec))
    assert spec["layer"][1]["transform"] == [{"filter": "isValid(datum.value)"}]  # coloured only where defined
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
        assert row["value"] == pytest.approx(corpus.means["sink"][layer, head])
        assert row["low"] == pytest.approx(corpus.low["sink"][layer, head])
        assert row["high"] == pytest.approx(corpus.high["sink"][layer, head])
        assert row["n"] == 3
    assert "mean over 3 texts" in spec["title"]["text"]


def test_selected_head_reads_streamlits_selection_state():
    assert selected_head({ATLAS_SELECTION: [{"layer": 3, "head": 5}]}) == (3, 5)
    assert selected_head({ATLAS_SELECTION: [{"layer": 1, "head": 0}, {"layer": 2, "head": 7}]}) == (2, 7)  # shift-click
    assert selected_head({ATLAS_SELECTION: [{"layer": 2.0, "head": "4"}]}) == (2, 4)
    for empty in (None, {}, {ATLAS_SELECTION: {}}, {ATLAS_SELECTION: []}, {"other": [{"layer": 1, "head": 1}]},
                  {ATLAS_SELECTION: [{"head": 1}]}):
        assert selected_head(empty) is None
