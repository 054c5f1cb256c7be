"""Many texts: streamed one forward pass each, small per-head numbers kept, seeded bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import HeadscopeError, analyze, corpus
from analysis.corpus import CORPUS_MEASURES, LAYER_MEASURES, analyze_corpus, compute_bootstrap_ci, parse_texts
from tests.reference import assert_rank_statistics_close

NOT_JSON = "cannot be read as JSON (Expecting value at column 1)"  # json's own words for a line that is not JSON

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "from", "home", "in", "rain"]


def short_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small for threads: one thread is several times faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts():
    return short_texts(200)


@pytest.fixture(scope="module")
def spied(gpt2, texts):
    """The corpus of 200 texts (one empty, one bad JSONL item), with every batch it ran and its progress calls."""
    batches, calls, passes = [], [], []
    real, real_pass = corpus.capture_texts, corpus.run_pass

    def spy(loaded, strings, batch_size, *args, **kwargs):
        batches.append((len(strings), batch_size))
        return real(loaded, strings, batch_size, *args, **kwargs)

    def spy_pass(loaded, items, *args, **kwargs):
        texts = real_pass(loaded, items, *args, **kwargs)
        passes.append((kwargs.get("pattern_layers"), [text.patterns for text in texts]))
        return texts

    inputs = [*texts[:10], "", HeadscopeError("line 12 is not a JSON object."), *texts[10:]]
    corpus.capture_texts, corpus.run_pass = spy, spy_pass
    try:
        result = analyze_corpus(gpt2, inputs, progress=lambda done, total: calls.append((done, total)), batch_size=32)
    finally:
        corpus.capture_texts, corpus.run_pass = real, real_pass
    return result, (batches, passes), calls


def test_parse_texts_reads_lines_and_jsonl_keeping_bad_lines_as_errors():
    assert parse_texts("one\n\n two \nthree") == ["one", " two ", "three"]
    parsed = parse_texts('{"text": "a"}\n{"title": "b"}\nnot json\n{"text": "c"}')
    assert parsed[0] == "a" and parsed[3] == "c"
    assert [str(p) for p in parsed[1:3]] == ['line 2 has no string "text" field.', f"line 3 {NOT_JSON}."]
    with pytest.raises(HeadscopeError, match="holds no texts"):
        parse_texts(" \n\n")


def test_bootstrap_mean_interval_and_seed():
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, (50, 3, 4))  # [text, layer, head]
    mean, low, high = compute_bootstrap_ci(values, n_boot=500, seed=0)
    assert mean.shape == low.shape == high.shape == (3, 4)
    np.testing.assert_allclose(mean, values.mean(axis=0))
    assert (low < mean).all() and (mean < high).all()
    # the percentile interval of a mean is about +-1.96 standard errors
    np.testing.assert_allclose(high - low, 2 * 1.96 * values.std(axis=0, ddof=1) / np.sqrt(50), rtol=0.25)
    again = compute_bootstrap_ci(values, n_boot=500, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((mean, low, high), again))
    other = compute_bootstrap_ci(values, n_boot=500, seed=1)
    assert not np.array_equal(low, other[1])


def test_bootstrap_skips_undefined_values_and_constant_values_have_no_width():
    values = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, 5.0], [np.nan, np.nan, 5.0]])  # [text, cell]
    mean, low, high = compute_bootstrap_ci(values, n_boot=200)
    assert mean[0] == 2.0 and 1.0 <= low[0] <= high[0] <= 3.0
    assert np.isnan(mean[1]) and np.isnan(low[1]) and np.isnan(high[1])
    assert low[2] == high[2] == mean[2] == 5.0


def test_a_corpus_streams_without_patterns_and_records_failures(spied, texts):
    result, (batches, passes), calls = spied
    assert passes and all(layers == [] and all(p == {} for p in kept) for layers, kept in passes)  # no T x T
    assert batches == [(32, 32)] * 6 + [(9, 32)]  # 201 strings (one empty) in batches of 32
    assert calls == [(i, 202) for i in range(1, 203)]
    assert len(result.texts) == 202 and result.n_analysed == 200
    assert [(r.number, r.error) for r in result.failures] == [
        (11, "The text is empty: type a sentence to analyse."), (12, "line 12 is not a JSON object.")]
    for name in CORPUS_MEASURES:
        assert result.values[name].shape == (200, 8, 12) and result.means[name].shape == (8, 12)
    for name in LAYER_MEASURES:
        assert result.layer_values[name].shape == (200, 8) and result.means[name].shape == (8,)


def test_per_text_numbers_are_the_engines(gpt2, spied, texts):
    result, _, _ = spied
    for row, text in ((0, texts[0]), (150, texts[150])):
        expected = analyze(gpt2, text, layers=None)  # one text alone; the corpus ran it in a padded batch of 32,
        for name, scores in expected.head_scores.items():  # whose matrix products round differently (~1e-6)
            np.testing.assert_allclose(result.values[name][row], scores, rtol=1e-5, atol=1e-6)
        for layer, data in expected.layers.items():
            np.testing.assert_allclose(result.values["q_mean"][row, layer], data.q_means, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(result.values["k_std"][row, layer], data.k_stds, rtol=1e-5, atol=1e-6)
            assert_rank_statistics_close((None, result.layer_values["rank_biserial_centered"][row, layer]),
                                         (None, data.dp_stats.rank_biserial_centered),
                                         data.dp_stats.same_head_dp_centered, data.dp_stats.diff_head_dp_centered,
                                         where=f"row {row} layer {layer}")
    np.testing.assert_allclose(result.means["induction"], np.nanmean(result.values["induction"], axis=0))


def test_corpus_passes_measure_on_the_device_and_equal_the_numpy_route(gpt2, texts):
    """capture_texts measures every layer in the pass (no q or k reach the host) and gives the numbers the numpy
    definitions give from the kept q and k of `capture`; a Capture measured with another exclude_first_token is
    refused rather than read wrongly."""
    from analysis import capture
    from analysis.corpus import capture_texts, compute_text_values

    model = gpt2.info.to_dict()
    for exclude in (True, False):
        measured = capture_texts(gpt2, texts[:6], batch_size=3, exclude_first_token=exclude)
        for captured, text in zip(measured, texts[:6]):
            assert captured.q == () and sorted(captured.measures) == list(range(gpt2.info.n_layers))
            assert captured.exclude_first_token is exclude
            heads, layers = compute_text_values(captured, model, exclude_first_token=exclude)
            want_heads, want_layers = compute_text_values(capture(gpt2, text, pattern_layers=[]), model,
                                                          exclude_first_token=exclude)
            for name, values in want_heads.items():  # its own unpadded pass: the same numbers to rounding
                np.testing.assert_allclose(heads[name], values, rtol=1e-5, atol=1e-6, err_msg=name)
            for name, values in want_layers.items():
                np.testing.assert_allclose(layers[name], values, rtol=0, atol=1e-4, err_msg=name)
        with pytest.raises(ValueError, match="exclude_first_token"):
            compute_text_values(measured[0], model, exclude_first_token=not exclude)


def test_intervals_narrow_as_texts_are_added(gpt2, spied, texts):
    many, _, _ = spied
    few = analyze_corpus(gpt2, texts[:20])  # other batches than `many`'s: the same numbers up to rounding
    np.testing.assert_allclose(few.values["sink"], many.values["sink"][:20], rtol=1e-5, atol=1e-6)
    for name in (*CORPUS_MEASURES, *LAYER_MEASURES):
        width_few = np.nanmean(few.high[name] - few.low[name])
        width_many = np.nanmean(many.high[name] - many.low[name])
        assert width_many < 0.6 * width_few, name  # about sqrt(20 / 200) = 0.32
        inside = (many.low[name] <= many.means[name]) & (many.means[name] <= many.high[name])
        assert inside[np.isfinite(many.means[name])].all()


def test_to_dict_is_json_ready(spied):
    import json

    result, _, _ = spied
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["schema"] == "headscope.corpus/1" and data["n_analysed"] == 200
    assert len(data["stats"]["induction"]["mean"]) == 8 and data["settings"]["n_boot"] == 1000
