"""A corpus pass measured for all its texts at once (analysis.batched, a GPU's route) gives each text the numbers of
its text-by-text measurement (the CPU's route), on every family's padding side and masks, with one set of operations
for the whole pass."""

from __future__ import annotations

import importlib
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis import analyze, load_model
from analysis.corpus import CORPUS_MEASURES, LAYER_MEASURES, capture_texts, text_values
from analysis.metrics import compute_mannwhitney_parts_t
from tests import checkpoints
from tests.reference import assert_rank_statistics_close

capture = importlib.import_module("analysis.capture")  # the module (analysis.capture is also a function)
corpus = importlib.import_module("analysis.corpus")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "from", "home", "in", "rain"]
FAMILIES = {  # padding side, masks and attention each family brings
    "gpt2": lambda path: checkpoints.tiny_gpt2(path, n_layer=2, n_head=4, n_embd=32),  # right padding
    "bert": lambda path: checkpoints.tiny_bert(path, n_layer=2, n_head=4, hidden=32),  # an encoder: every key
    "llama": checkpoints.tiny_llama,  # left padding, grouped-query attention
    "mistral": checkpoints.tiny_mistral,  # a sliding window shorter than the texts
    "gemma2": checkpoints.tiny_gemma2,  # soft-capped scores, eager attention on every route
    # config.is_causal false (loading.attention_is_causal): bidirectional masks, a window on both sides of each query
    "mistral-encoder": lambda path: checkpoints.tiny_mistral(path, sliding_window=4, is_causal=False),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: load_model(str(build(tmp_path_factory.mktemp(f"tiny-{name}")))) for name, build in FAMILIES.items()}


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of 1 to 13 words (one token to a few dozen), so every pass pads some of its texts."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 14)))) for _ in range(n)]


@pytest.mark.parametrize("route", ["eager", "sdpa"])
@pytest.mark.parametrize("budget", [None, 2**14], ids=["one-block", "small-blocks"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_pass_measured_at_once_gives_each_text_its_own_numbers(models, monkeypatch, name, route, budget):
    """Head scores to float32 rounding (the pattern rebuilt over the padded row sums its zeros too), Q/K statistics
    and rank statistics exactly as text by text: the same float64 values, ranked the same. A small work budget
    splits the pass into blocks of a few query rows and chunks of texts."""
    loaded = models[name]
    texts = varied_texts(20)
    if route == "sdpa":  # the fused kernel and sdpa's boolean masks (corpus_route picks eager on the CPU)
        monkeypatch.setattr(corpus, "EAGER_BUDGET", 0)
    if budget is not None:  # blocks of query rows and chunks of texts
        monkeypatch.setitem(capture.WORK_BUDGET, "cpu", budget)
        monkeypatch.setitem(capture.TEXTS_BUDGET, "cpu", budget)
    model = loaded.info.to_dict()
    passes = []
    real = corpus.compute_pass_values
    monkeypatch.setattr(corpus, "compute_pass_values", lambda *args: passes.append(1) or real(*args))
    for exclude in (True, False):
        reduce = text_values(model, exclude)
        each = capture_texts(loaded, texts, 8, reduce, exclude)
        assert not passes  # text by text: one Capture a text
        monkeypatch.setitem(capture.TEXTS_AT_ONCE, "cpu", True)
        together = capture_texts(loaded, texts, 8, reduce, exclude)  # the corpus's values of each pass at once
        assert passes
        passes.clear()
        captures = [reduce(captured) for captured in capture_texts(loaded, texts, 8, None, exclude)]  # one Capture
        # a text, its dot products reduced to the Mann-Whitney parts and their sizes
        monkeypatch.setitem(capture.TEXTS_AT_ONCE, "cpu", False)
        for how, got in (("at once", together), ("at once, a Capture a text", captures)):
            for number, ((want_heads, want_layers, want_n), (heads, layers, n)) in enumerate(zip(each, got)):
                assert n == want_n
                where = f"{name} {route} {how} text {number}"
                for measure in CORPUS_MEASURES:
                    atol = 1e-6 if measure in corpus.HEAD_SCORE_NAMES else 1e-12
                    np.testing.assert_allclose(heads[measure], want_heads[measure], rtol=0, atol=atol,
                                               err_msg=f"{where} {measure}")
                for measure in LAYER_MEASURES:
                    np.testing.assert_allclose(layers[measure], want_layers[measure], rtol=0, atol=1e-12,
                                               err_msg=f"{where} {measure}")


def test_padded_mann_whitney_parts_equal_each_rows_own():
    """Rows of different lengths padded with +inf into one tensor: each row's U and tie term as computed alone,
    and U as scipy's (ties included)."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 6, n1).astype(float), rng.integers(0, 6, n2).astype(float))  # many ties
            for n1, n2 in ((12, 30), (9, 9), (20, 11))]
    width1, width2 = (max(len(row[i]) for row in rows) + 3 for i in (0, 1))

    def padded(values, width):
        return np.concatenate([values, np.full(width - len(values), np.inf)])

    same = torch.tensor(np.stack([padded(s, width1) for s, _ in rows]))  # [row, width1]
    diff = torch.tensor(np.stack([padded(d, width2) for _, d in rows]))  # [row, width2]
    together = compute_mannwhitney_parts_t(same, diff, padded=True)  # [row, 2]
    for i, (s, d) in enumerate(rows):
        alone = compute_mannwhitney_parts_t(torch.tensor(s), torch.tensor(d))  # [2]
        np.testing.assert_array_equal(together[i].numpy(), alone.numpy())
        assert float(together[i, 0]) == mannwhitneyu(s, d).statistic


class Count(TorchDispatchMode):
    """The operations that are not views: kernels on a GPU."""

    def __init__(self):
        super().__init__()
        self.operations = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.operations[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_pass_measures_all_its_texts_with_one_set_of_operations(models, monkeypatch):
    """Three texts or twelve of one padded width: the same operations, as many of each (a loop over the texts
    would grow with them); a pass of one text goes text by text."""
    loaded = models["llama"]
    monkeypatch.setitem(capture.TEXTS_AT_ONCE, "cpu", True)
    counts, calls = [], []
    real = capture._Recorder.measure_texts

    def counted(self, *args):
        calls.append(len(self.texts))
        mode = Count()
        with mode:
            real(self, *args)
        counts.append(mode.operations)

    monkeypatch.setattr(capture._Recorder, "measure_texts", counted)
    texts = [" ".join(["cat"] * 3 + WORDS[:i % 4]) for i in range(12)]  # 4 to 7 words: one padded width
    for n in (1, 3, 12):
        capture_texts(loaded, texts[:n], n, text_values(loaded.info.to_dict()))
    assert calls == [3, 12]
    assert counts[0] == counts[1]


def test_a_batch_of_texts_is_tokenized_as_each_text_alone(models):
    """capture.text_inputs (one tokenizer call for a corpus's batch) gives each text the ids, special-token flags
    and extra inputs of the tokenizer called on that text alone (capture.tokenize), or its error (empty, too long)
    in its place."""
    texts = ["Hello world", "", "   ", "The cat [SEP] sat <s> on </s> the mat", "x" * 3000, "a"]
    for name, loaded in models.items():
        many = capture.text_inputs(loaded, texts)
        for text, got in zip(texts, many):
            try:
                alone = capture.tokenize(loaded, text)  # {name: [1, pos]}
            except capture.HeadscopeError as exc:
                assert isinstance(got, capture.HeadscopeError) and str(got) == str(exc), (name, text)
                continue
            ids = alone.pop("input_ids")[0].numpy()  # [pos]
            special = alone.pop("special_tokens_mask")[0].numpy().astype(bool)  # [pos]: the ones it added
            special |= np.isin(ids, capture.marked_special_ids(loaded.tokenizer))  # [pos]: and typed ones (not
            # [UNK], a word: test_families.test_an_unknown_word_is_a_text_position_not_a_special_token)
            assert np.array_equal(got.ids, ids) and got.ids.dtype == ids.dtype, (name, text)
            assert np.array_equal(got.special, special), (name, text)
            extra = {field: values[0].numpy() for field, values in alone.items() if field != "attention_mask"}
            assert got.extra.keys() == extra.keys(), (name, text)
            for field, values in extra.items():
                np.testing.assert_array_equal(got.extra[field], values)
                assert got.extra[field].dtype == values.dtype
        assert sum(isinstance(item, capture.TextInput) for item in many) >= 3
        refused = capture.text_inputs(loaded, ["a cat", "\ud800", "a dog"])  # a lone surrogate: the tokenizer raises
        assert [type(item).__name__ for item in refused] == ["TextInput", "HeadscopeError", "TextInput"]
        assert str(refused[1]).startswith("The tokenizer cannot read this text")
        np.testing.assert_array_equal(refused[2].ids, capture.tokenize(loaded, "a dog")["input_ids"][0].numpy())


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_passes_by_length_are_full_and_give_each_text_its_numbers(models, monkeypatch, name):
    """A GPU's corpus passes (corpus.PASSES_BY_LENGTH): `batch_size` texts a pass, cut from the texts sorted by
    length and padded to the longest one's width, each text's results in its own place; its numbers those of the
    CPU's passes grouped by padded width to float rounding (a wider padding changes the forward's rounding)."""
    loaded = models[name]
    texts = varied_texts(20, seed=1)
    reduce = text_values(loaded.info.to_dict())
    grouped = capture_texts(loaded, texts, 8, reduce)
    monkeypatch.setitem(corpus.PASSES_BY_LENGTH, "cpu", True)
    monkeypatch.setitem(capture.TEXTS_AT_ONCE, "cpu", True)
    passes = []
    real = corpus._capture_pass
    monkeypatch.setattr(corpus, "_capture_pass", lambda loaded, items, width, *args: passes.append(
        (width, [item.ids.size for item in items])) or real(loaded, items, width, *args))
    by_length = capture_texts(loaded, texts, 8, reduce)
    assert [len(sizes) for _, sizes in passes] == [8, 8, 4]
    lengths = [size for _, sizes in passes for size in sizes]
    assert lengths == sorted(lengths)
    assert all(width == corpus.padded_width(max(sizes)) for width, sizes in passes)
    assert any(len({corpus.padded_width(n) for n in sizes}) > 1 for _, sizes in passes)  # widths mixed
    for number, ((want_heads, want_layers, want_n), (heads, layers, n)) in enumerate(zip(grouped, by_length)):
        assert n == want_n
        for measure in CORPUS_MEASURES:
            np.testing.assert_allclose(heads[measure], want_heads[measure], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} text {number} {measure}")
        alone = analyze(loaded, texts[number], layers=None)  # its dot products: which pairs rounding can flip
        for layer, data in alone.layers.items():
            for measure, dps in zip(LAYER_MEASURES, ((data.same_head_dp, data.diff_head_dp),
                                                     (data.dp_stats.same_head_dp_centered,
                                                      data.dp_stats.diff_head_dp_centered))):
                assert_rank_statistics_close((None, layers[measure][layer]), (None, want_layers[measure][layer]),
                                             *dps, where=f"{name} text {number} {measure} layer {layer}")


def test_a_corpus_reads_ahead_to_fill_its_passes(models, monkeypatch):
    """analyze_corpus hands capture_texts READ_AHEAD batches of texts at a time, and their results keep the
    texts' order."""
    loaded = models["gpt2"]
    texts = varied_texts(20, seed=2)
    calls = []
    real = corpus.capture_texts
    monkeypatch.setattr(corpus, "capture_texts", lambda loaded, chunk, *args: calls.append(len(chunk)) or real(
        loaded, chunk, *args))
    one = corpus.analyze_corpus(loaded, texts, batch_size=4, n_boot=10)
    assert calls == [4] * 5
    calls.clear()
    monkeypatch.setitem(corpus.READ_AHEAD, "cpu", 3)
    ahead = corpus.analyze_corpus(loaded, texts, batch_size=4, n_boot=10)
    assert calls == [12, 8]
    assert ahead.texts == one.texts  # each text's number, excerpt and token count, in order
    for name, values in one.values.items():
        np.testing.assert_array_equal(ahead.values[name], values)  # the CPU's rows: bit for bit, in any batch
