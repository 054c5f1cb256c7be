"""The ablation atlas against hand-written hooks, edited weights and transformers' own loss (the ground truth)."""

import copy
import math

import numpy as np
import pytest
import torch

from analysis import HeadscopeError, ablation, load_model
from analysis.ablation import MEASURES, compute_ablated, compute_ablation, encode, mask_positions, out_projections
from tests.analysis.test_families import BUILDERS
from tests.conftest import REPEATS
from tests.lm_checkpoints import tiny_bert_mlm, tiny_gpt2_lm

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory):
    return load_model(str(tiny_gpt2_lm(tmp_path_factory.mktemp("gpt2-lm"))), head=True)


@pytest.fixture(scope="module")
def minilm_head():
    return load_model("minilm", head=True)


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
    return load_model(str(tiny_bert_mlm(tmp_path_factory.mktemp("bert-mlm"))), head=True)


def _ids(loaded, text=REPEATS):
    return torch.tensor([loaded.tokenizer(text)["input_ids"]])  # [batch=1, pos]


def _hf_loss(lm, ids, labels=None):
    """transformers' own loss: next-token CE for a causal LM, CE at labels != -100 for a masked LM."""
    with torch.no_grad():
        return float(lm(input_ids=ids, labels=ids if labels is None else labels).loss)


def _slice_hook(head, d_head, value=None):
    """A hand-written pre-hook: head `head`'s slice of the projection's input set to 0 or to `value`."""
    def hook(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0 if value is None else value
        return (x,)
    return hook


def _head_means(module, lm, ids, n_heads, d_head):
    """Each head's mean projection input over positions, recorded by a hand-written hook: [head, d_head]."""
    seen = {}
    handle = module.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0][0].clone()))
    _hf_loss(lm, ids)
    handle.remove()
    return seen["x"].reshape(-1, n_heads, d_head).mean(dim=0)  # [head, d_head]


def test_loading_with_head_keeps_the_base_for_the_engine(gpt2_lm, minilm_head):
    assert type(gpt2_lm.lm).__name__ == "GPT2LMHeadModel" and gpt2_lm.model is gpt2_lm.lm.base_model
    assert minilm_head.lm is None  # MiniLM's checkpoint has no MLM head: not invented


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_one_head_matches_a_hand_written_hook(gpt2_lm, mode):
    info = gpt2_lm.info
    atlas = compute_ablation(gpt2_lm, REPEATS, mode)
    assert atlas.measure == "next_token_loss" and atlas.delta.shape == (info.n_layers, info.n_heads)
    ids = _ids(gpt2_lm)
    clean = _hf_loss(gpt2_lm.lm, ids)
    module = gpt2_lm.model.h[LAYER].attn.c_proj
    value = None if mode == "zero" else _head_means(module, gpt2_lm.lm, ids, info.n_heads, info.d_head)[HEAD]
    handle = module.register_forward_pre_hook(_slice_hook(HEAD, info.d_head, value))
    try:
        ablated = _hf_loss(gpt2_lm.lm, ids)
    finally:
        handle.remove()
    assert atlas.baseline == pytest.approx(clean, abs=1e-5)
    assert atlas.delta[LAYER, HEAD] == pytest.approx(ablated - clean, abs=1e-5)
    assert abs(ablated - clean) > 1e-4  # the head matters, so the comparison above means something


def test_zero_and_mean_ablation_equal_editing_the_weights(gpt2_lm):
    """c_proj(x) = x W + b: zeroing a head's slice of x = zeroing its rows of W; its mean = those rows' output in b."""
    info, ids = gpt2_lm.info, _ids(gpt2_lm)
    clean = _hf_loss(gpt2_lm.lm, ids)
    means = _head_means(gpt2_lm.model.h[LAYER].attn.c_proj, gpt2_lm.lm, ids, info.n_heads, info.d_head)
    rows = slice(HEAD * info.d_head, (HEAD + 1) * info.d_head)
    for mode in ("zero", "mean"):
        edited = copy.deepcopy(gpt2_lm.lm)
        proj = edited.transformer.h[LAYER].attn.c_proj  # Conv1D: weight [in, out]
        with torch.no_grad():
            if mode == "mean":
                proj.bias += means[HEAD] @ proj.weight[rows]  # [d_head] @ [d_head, d_model]
            proj.weight[rows] = 0
        expected = _hf_loss(edited, ids) - clean
        got = compute_ablated(gpt2_lm, REPEATS, [(LAYER, HEAD)], mode)["values"][0]
        assert got == pytest.approx(expected, abs=1e-5), mode


def test_ablating_nothing_gives_zero_in_any_batch_row(gpt2_lm):
    out = compute_ablated(gpt2_lm, REPEATS, [None, (LAYER, HEAD), None, None, (0, 0)], "zero", batch_size=2)
    assert out["n_passes"] == 1 + 3 and out["batch_size"] == 2
    assert np.abs(out["values"][[0, 2, 3]]).max() < 1e-5
    assert abs(out["values"][1]) > 1e-4


def test_batch_size_changes_nothing_and_costs_fewer_passes(gpt2_lm):
    info = gpt2_lm.info
    one = compute_ablation(gpt2_lm, REPEATS, "mean", batch_size=1)
    five = compute_ablation(gpt2_lm, REPEATS, "mean", batch_size=5)
    np.testing.assert_allclose(one.delta, five.delta, atol=1e-5)
    assert one.n_passes == 1 + info.n_layers * info.n_heads
    assert five.n_passes == 1 + math.ceil(info.n_layers * info.n_heads / 5)


def test_hooks_are_inert_outside_an_ablation_and_installed_once(gpt2_lm):
    ids = _ids(gpt2_lm)
    before = _hf_loss(gpt2_lm.lm, ids)
    compute_ablation(gpt2_lm, REPEATS, "zero")
    compute_ablation(gpt2_lm, REPEATS, "mean")
    assert all(len(module._forward_pre_hooks) == 1 for module in out_projections(gpt2_lm))
    assert ablation._PLAN.get() is None
    assert _hf_loss(gpt2_lm.lm, ids) == before


def test_another_thread_running_the_model_meanwhile_is_not_ablated(gpt2_lm):
    """A second thread's forward pass while the ablation runs sees the unablated model (the plan is per context)."""
    import threading

    ids = _ids(gpt2_lm)
    clean = _hf_loss(gpt2_lm.lm, ids)
    seen = []

    def other_session():
        while not done.is_set():
            seen.append(_hf_loss(gpt2_lm.lm, ids))

    done = threading.Event()
    thread = threading.Thread(target=other_session)
    thread.start()
    try:
        compute_ablation(gpt2_lm, REPEATS, "zero", batch_size=1)
    finally:
        done.set()
        thread.join()
    assert seen and all(loss == pytest.approx(clean, abs=1e-6) for loss in seen)


def test_masked_lm_uses_one_seeded_mask_for_every_head(bert_mlm):
    info = bert_mlm.info
    ids = encode(bert_mlm, REPEATS)
    special = np.isin(ids.numpy(), bert_mlm.tokenizer.all_special_ids)
    masked = mask_positions(bert_mlm, ids, seed=3)
    assert len(masked) == round(0.15 * (~special).sum()) and not special[masked].any()
    assert not np.array_equal(masked, mask_positions(bert_mlm, ids, seed=4))
    atlas = compute_ablation(bert_mlm, REPEATS, "zero", seed=3)
    assert atlas.measure == "masked_token_loss" and atlas.masked_positions == tuple(masked)
    # the hand-written version: [MASK] at those positions, transformers' loss on them only
    inputs = ids.clone()
    inputs[masked] = bert_mlm.tokenizer.mask_token_id
    labels = torch.full_like(ids, -100)
    labels[masked] = ids[masked]
    clean = _hf_loss(bert_mlm.lm, inputs[None], labels[None])
    assert atlas.baseline == pytest.approx(clean, abs=1e-5)
    for layer, head in [(0, 1), (info.n_layers - 1, info.n_heads - 1)]:
        module = bert_mlm.model.encoder.layer[layer].attention.output.dense
        handle = module.register_forward_pre_hook(_slice_hook(head, info.d_head))
        try:
            ablated = _hf_loss(bert_mlm.lm, inputs[None], labels[None])
        finally:
            handle.remove()
        assert atlas.delta[layer, head] == pytest.approx(ablated - clean, abs=1e-5)


def test_without_an_lm_head_it_shows_the_hidden_state_change(minilm_head):
    loaded = minilm_head
    atlas = compute_ablation(loaded, "The cat sat on the mat.", "zero")
    assert atlas.measure == "hidden_state_change" and atlas.baseline is None
    assert "no LM head" in atlas.description and atlas.description.endswith(MEASURES["hidden_state_change"])
    ids = _ids(loaded, "The cat sat on the mat.")
    with torch.no_grad():
        clean = loaded.model(input_ids=ids).last_hidden_state[0]  # [pos, d_model]
        handle = loaded.model.encoder.layer[5].attention.output.dense.register_forward_pre_hook(
            _slice_hook(3, loaded.info.d_head))
        try:
            ablated = loaded.model(input_ids=ids).last_hidden_state[0]  # [pos, d_model]
        finally:
            handle.remove()
    expected = float(((ablated - clean).norm(dim=-1) / clean.norm(dim=-1)).mean())
    assert atlas.delta[5, 3] == pytest.approx(expected, rel=1e-4)
    assert (atlas.delta >= 0).all()


def test_json_round_trip(gpt2_lm):
    from analysis.ablation import AblationResult

    atlas = compute_ablation(gpt2_lm, REPEATS, "zero")
    back = AblationResult.from_dict(atlas.to_dict())
    np.testing.assert_array_equal(back.delta, atlas.delta)
    assert back.to_dict() == atlas.to_dict()


def test_an_undefined_loss_is_null_in_json_and_nan_again_when_read():
    """float16 logits past 65504 give an inf or NaN loss: JSON (RFC 8259, allow_nan=False) holds null there, as
    the head scores do, and reading it back gives NaN, so the chart draws the cell grey."""
    import json

    from analysis.ablation import AblationResult

    delta = np.array([[0.5, np.nan], [np.inf, -np.inf]])  # [layer, head]
    atlas = AblationResult(mode="zero", measure="next_token_loss", delta=delta, baseline=math.nan, tokens=("a", "b"))
    data = json.loads(json.dumps(atlas.to_dict(), allow_nan=False))
    assert data["baseline"] is None
    assert data["delta"] == [[float(v) if np.isfinite(v) else None for v in row] for row in delta]
    back = AblationResult.from_dict(data)
    assert math.isnan(back.baseline) and back.to_dict() == data
    np.testing.assert_array_equal(np.isfinite(back.delta), np.isfinite(delta))
    hidden = AblationResult.from_dict({**data, "measure": "hidden_state_change"})
    assert hidden.baseline is None  # no loss measured: None, not an undefined loss


@pytest.mark.parametrize("text, mode, message", [
    ("The cat.", "half", "Unknown ablation 'half'"),
    ("   ", "zero", "empty"),
])
def test_bad_input_is_one_clear_error(gpt2_lm, text, mode, message):
    with pytest.raises(HeadscopeError, match=message):
        compute_ablation(gpt2_lm, text, mode)


def test_one_token_has_no_next_token_loss(gpt2_lm):
    with pytest.raises(HeadscopeError, match="at least 2 tokens"):
        compute_ablation(gpt2_lm, [5], "zero")


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_every_family_matches_an_edited_copy_of_the_weights(model_type, tmp_path):
    """Zero-ablating head h = zeroing the projection's input columns of h (its weight's rows, for GPT-2's Conv1D):
    an edited copy of the model, measured by hand (transformers' own loss, or the hidden-state change)."""
    import re

    loaded = load_model(str(BUILDERS[model_type](tmp_path / model_type)), head=True)
    info = loaded.info
    layer, head = info.n_layers - 1, info.n_heads - 1
    atlas = compute_ablation(loaded, REPEATS, "zero")
    assert atlas.measure == ablation.measure_of(loaded)
    full = loaded.lm if loaded.lm is not None else loaded.model
    edited = copy.deepcopy(full)
    pattern = re.compile(ablation.OUT_PROJECTIONS[info.family])
    (proj,) = [m for name, m in edited.named_modules() if (found := pattern.search(name)) and int(found[1]) == layer]
    cols = slice(head * info.d_head, (head + 1) * info.d_head)
    with torch.no_grad():
        if isinstance(proj, torch.nn.Linear):
            proj.weight[:, cols] = 0  # [out, in]
        else:  # Conv1D: [in, out]
            proj.weight[cols] = 0
    ids = _ids(loaded)
    if loaded.lm is None:
        with torch.no_grad():
            clean = full(input_ids=ids).last_hidden_state[0]  # [pos, d_model]
            changed = edited(input_ids=ids).last_hidden_state[0]  # [pos, d_model]
        expected = float(((changed - clean).norm(dim=-1) / clean.norm(dim=-1)).mean())
    else:
        assert info.causal  # the family builders save base models: only tied causal heads come back here
        expected = _hf_loss(edited, ids) - _hf_loss(full, ids)
    assert atlas.delta[layer, head] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert abs(expected) > 1e-6


def test_a_causal_lm_used_as_an_encoder_keeps_its_next_token_loss(tmp_path):
    """config.is_causal False makes Gemma 2's attention bidirectional (ModelInfo.causal false), not its head: the
    causal LM head still predicts the next token, so the ablation measures transformers' own causal-LM loss (not a
    masked-token loss read from next-token logits)."""
    from tests import checkpoints

    path = checkpoints.tiny_gemma2(tmp_path / "gemma2", use_bidirectional_attention=True, is_causal=False)
    loaded = load_model(str(path), head=True)
    assert not loaded.info.causal and loaded.lm is not None
    atlas = compute_ablation(loaded, REPEATS, "zero")
    assert atlas.measure == ablation.measure_of(loaded) == "next_token_loss"
    assert atlas.baseline == pytest.approx(_hf_loss(loaded.lm, _ids(loaded)), rel=1e-5)
