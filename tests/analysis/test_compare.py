"""Two checkpoints side by side: two seeds of one tiny GPT-2 (one tokenizer), and a tokenizer that differs."""

import numpy as np
import pytest

from analysis import HeadscopeError, analyze, load_model
from analysis.ablation import compute_ablation
from analysis.compare import compare_models
from tests.conftest import REPEATS
from tests.lm_checkpoints import tiny_gpt2_lm


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The same architecture and tokenizer, weights from seeds 0 and 1 (two 'training checkpoints')."""
    return [load_model(str(tiny_gpt2_lm(tmp_path_factory.mktemp(f"seed{seed}"), seed=seed)), head=True)
            for seed in (0, 1)]


def test_two_seeds_atlases_difference_and_qk_stats(seeds):
    a, b = seeds
    result = compare_models(a, b, REPEATS, ablation="zero")
    alone_a, alone_b = analyze(a, REPEATS, None), analyze(b, REPEATS, None)
    assert result.a.head_scores.keys() == result.score_difference.keys() and len(result.score_difference) == 6
    for name, difference in result.score_difference.items():
        np.testing.assert_array_equal(result.a.head_scores[name], alone_a.head_scores[name])
        np.testing.assert_array_equal(difference, alone_b.head_scores[name] - alone_a.head_scores[name])
    assert np.nanmax(np.abs(result.score_difference["entropy"])) > 1e-3  # the seeds really differ
    rows = result.qk_rows()
    assert len(rows) == a.info.n_layers * a.info.n_heads and rows[5]["label"] == "L1H1"
    assert rows[5]["q_means_a"] == pytest.approx(alone_a.layers[1].q_means[1])
    assert rows[5]["k_stds_b"] == pytest.approx(alone_b.layers[1].k_stds[1])
    np.testing.assert_allclose(result.ablation_difference,
                               compute_ablation(b, REPEATS).delta - compute_ablation(a, REPEATS).delta, atol=1e-6)
    data = result.to_dict()
    assert data["schema"] == "headscope.compare/1" and data["ablation"]["a"]["measure"] == "next_token_loss"


def test_a_model_against_itself_differs_by_nothing(seeds):
    result = compare_models(seeds[0], seeds[0], REPEATS, layers=[1])
    assert all(np.nan_to_num(values).max() == 0 == np.nan_to_num(values).min()
               for values in result.score_difference.values())
    assert all(row[f"{name}_a"] == row[f"{name}_b"] for row in result.qk_rows()
               for name in ("q_means", "q_stds", "k_means", "k_stds"))


def test_a_different_tokenizer_is_one_clear_error(seeds, tmp_path):
    other = load_model(str(tiny_gpt2_lm(tmp_path / "other-vocab", vocab_size=400)))
    with pytest.raises(HeadscopeError, match="does not use the same tokenizer"):
        compare_models(seeds[0], other, REPEATS)


def test_different_shapes_are_side_by_side_without_difference(seeds, tmp_path):
    deeper = load_model(str(tiny_gpt2_lm(tmp_path / "deeper", n_layer=4)))
    result = compare_models(seeds[0], deeper, REPEATS)
    assert result.score_difference == {} and "without a difference" in result.warnings[0]
    assert result.b.head_scores["entropy"].shape == (4, 4)
    rows = result.qk_rows()  # every layer of either model, each side's value or None
    assert len(rows) == 4 * 4 and {row["layer"] for row in rows} == {0, 1, 2, 3}
    beyond_a = [row for row in rows if row["layer"] >= seeds[0].info.n_layers]
    assert beyond_a and all(row["q_means_a"] is None and row["q_means_b"] is not None for row in beyond_a)
    assert rows[-1]["q_means_b"] == pytest.approx(result.b.layers[3].q_means[3])


def test_a_layer_only_one_model_has_names_that_model(seeds, tmp_path):
    """Layer 2 of A (3 layers) against a 1-layer B was refused as 'this model has layers 0..0', which A is not."""
    shallow = load_model(str(tiny_gpt2_lm(tmp_path / "shallow", n_layer=1)))
    with pytest.raises(HeadscopeError) as info:
        compare_models(seeds[0], shallow, REPEATS, layers=[2])
    assert str(info.value) == (f"Layer 2 is out of range for {shallow.info.id}, which has layers 0..0: compare a "
                               "layer both models have (0..0).")
