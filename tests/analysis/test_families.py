"""Every supported family, exactly: a tiny random checkpoint of each, loaded through load_model from its
directory, must reproduce the model's own eager attention on every layer (issue 5).

Ground truth is a second copy of the same checkpoint loaded with attn_implementation="eager" and its
output_attentions, never numbers typed in here.
"""

import numpy as np
import pytest
import torch

from analysis import HeadscopeError, analyze, capture, load_model, summarize
from analysis.loading import FAMILIES, PARITY_TOLERANCE
from analysis.metrics import compute_pattern
from analysis.results import ARRAY_FIELDS
from tests import checkpoints
from tests.conftest import FIJI
from tests.reference import assert_layer_rank_statistics_close

BUILDERS = {
    "gpt2": lambda path: checkpoints.tiny_gpt2(path, n_layer=2, n_head=4, n_embd=32),
    "bert": lambda path: checkpoints.tiny_bert(path, n_layer=2, n_head=4, hidden=32),
    "roberta": checkpoints.tiny_roberta,
    "distilbert": checkpoints.tiny_distilbert,
    "gpt_neox": checkpoints.tiny_gpt_neox,
    "llama": checkpoints.tiny_llama,
    "mistral": checkpoints.tiny_mistral,
    "qwen2": checkpoints.tiny_qwen2,
    "qwen3": checkpoints.tiny_qwen3,
    "gemma2": checkpoints.tiny_gemma2,
}
CAUSAL = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2"}
EXACT = 1e-5  # the issue's bound on parity_max_abs_err in float32
# Half precision vs float32, from the dtype's unit roundoff u = eps / 2 and the magnitudes involved.
# q and k: a value stored in half precision is off by at most u of itself per rounding. Per layer a value is
# rounded 14 times on the way through the residual stream: attention norm output, q/k/v projections, the weights,
# weights @ v, the output projection, the residual add; MLP norm output, up and gate projections, the activation,
# their product, the down projection, the residual add. Layer l's own q and k add 4 more (norm output, projection
# weights and output, rotary). So |q_half - q| <= R_l u max|q| with R_l = 14 l + 4, at first order; the same for k.
# Everything headscope measures is then computed in float32 from the q and k the half model used, so the rest is
# bounded by the q and k differences themselves (half_precision_tolerances), plus float32 rounding.
ROUNDINGS_PER_LAYER, ROUNDINGS_OWN = 14, 4
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory):
    return {}


def build(name, family_paths, tmp_path_factory):
    """model_type -> its tiny checkpoint directory, built once per session."""
    if name not in family_paths:
        family_paths[name] = BUILDERS[name](tmp_path_factory.mktemp(f"tiny-{name}"))
    return family_paths[name]


@pytest.fixture(params=sorted(BUILDERS))
def family_path(request, family_paths, tmp_path_factory):
    return request.param, build(request.param, family_paths, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_path(family_paths, tmp_path_factory):
    return build("llama", family_paths, tmp_path_factory)


@pytest.fixture(scope="session")
def llama(llama_path):
    return load_model(str(llama_path))


def eager_attentions(path, loaded, text):
    """The model's own attention weights: a second copy loaded with the stock eager implementation."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**loaded.tokenizer(text, return_tensors="pt"), output_attentions=True)
    return model, [weights[0].numpy() for weights in out.attentions]  # per layer [head, q_pos, k_pos]


def test_families_are_the_issues_list():
    assert set(FAMILIES) == set(BUILDERS)
    assert {model_type for model_type, (_, causal) in FAMILIES.items() if causal} == CAUSAL


def test_capture_reproduces_the_models_own_eager_attention(family_path):
    name, path = family_path
    loaded = load_model(str(path))
    captured = capture(loaded, FIJI)  # every layer's pattern
    model, expected = eager_attentions(path, loaded, FIJI)
    info, n = loaded.info, len(captured.tokens)
    assert info.family == FAMILIES[name][0]
    assert {module.is_causal for module in model.modules() if hasattr(module, "is_causal")} == {info.causal}
    assert len(captured.q) == len(captured.k) == len(expected) == info.n_layers == 2
    for layer in range(info.n_layers):
        assert captured.q[layer].shape == (info.n_heads, n, info.d_head)
        assert captured.k[layer].shape == (info.n_kv_heads, n, info.d_head)
        assert captured.parity[layer] <= EXACT, (name, layer, captured.parity[layer])
        np.testing.assert_allclose(captured.patterns[layer], expected[layer], rtol=0, atol=EXACT)
    if info.causal:  # nothing attends to the future
        assert np.abs(np.triu(captured.patterns[1], k=1)).max() == 0


def test_llama_grouped_query_attention(llama):
    """8 query heads read 2 key heads: K statistics per key head, "same head" = the query head's own key head."""
    assert (llama.info.n_heads, llama.info.n_kv_heads) == (8, 2)
    result = analyze(llama, FIJI, layers=[0, 1])
    captured = capture(llama, FIJI, pattern_layers=[])
    for layer, measured in result.layers.items():
        q, k = captured.q[layer], captured.k[layer]  # [8, pos, d_head], [2, pos, d_head]
        assert len(measured.k_means) == len(measured.k_stds) == 2
        for g in range(2):
            np.testing.assert_allclose(measured.k_means[g], k[g, 1:].astype(np.float64).mean(), rtol=1e-12)
        same, diff = [], []
        for qi in range(8):  # the notebook's loops, with the key head each query head reads
            for ki in range(2):
                for pos in range(1, q.shape[1] - 1):
                    dot = float(np.dot(q[qi, -1].astype(np.float64), k[ki, pos].astype(np.float64)))
                    (same if ki == qi // 4 else diff).append(dot)
        np.testing.assert_allclose(measured.same_head_dp, same, rtol=1e-10)
        np.testing.assert_allclose(measured.diff_head_dp, diff, rtol=1e-10)
        # and the model agrees: query head h attends with key head h // 4
        mask = torch.ones(q.shape[1], q.shape[1]).tril().bool()[None]  # [1, q_pos, k_pos] causal
        for h in range(8):
            own = compute_pattern(torch.from_numpy(q[h:h + 1]), torch.from_numpy(k[h // 4:h // 4 + 1]),
                                  q.shape[-1] ** -0.5, mask)  # [1, q_pos, k_pos]
            np.testing.assert_allclose(own[0].numpy(), measured.patterns[h], rtol=0, atol=EXACT)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_multi_query_attention_one_key_head(tmp_path_factory, attention):
    """num_key_value_heads=1 (multi-query attention): every query head reads the one key head, so every dot product
    is "same head", the different-head group is empty and its statistics null (as the numpy definition says); the
    pattern is still the model's own. Before, an empty index of other key heads came out float and the analysis
    raised an IndexError on every text."""
    from transformers import LlamaConfig

    from analysis import analyze_batch
    from analysis.metrics import compute_dot_products

    if "mqa" not in MQA:
        tokenizer = checkpoints.llama_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                             intermediate_size=128, **checkpoints._special_ids(tokenizer), **checkpoints.TINY)
        MQA["mqa"] = checkpoints.save_checkpoint(config, tokenizer, tmp_path_factory.mktemp("tiny-mqa"))
    path = MQA["mqa"]
    loaded = load_model(str(path))
    assert (loaded.info.n_heads, loaded.info.n_kv_heads) == (4, 1)
    result = analyze(loaded, FIJI, layers=[0, 1], attention=attention, keep_patterns=True)
    captured = capture(loaded, FIJI, pattern_layers=[])
    _, expected = eager_attentions(path, loaded, FIJI)
    for layer, measured in result.layers.items():
        same, diff = compute_dot_products(captured.q[layer], captured.k[layer])
        assert diff.size == 0 and len(measured.diff_head_dp) == 0
        # the sdpa route's q and k past layer 0 come through the fused kernel's rounding, not eager's
        close = {"rtol": 1e-10} if attention == "eager" else {"rtol": 1e-5, "atol": 1e-5}
        np.testing.assert_allclose(measured.same_head_dp, same, **close)
        assert measured.dp_stats.rank_biserial is None and measured.dp_stats.mannwhitney_p is None
        assert measured.parity_max_abs_err <= EXACT
        np.testing.assert_allclose(measured.patterns, expected[layer], rtol=0, atol=EXACT if attention == "eager"
                                   else 1e-4)
    [batched] = analyze_batch(loaded, [FIJI], layers=[0, 1], attention=attention)
    np.testing.assert_allclose(batched.layers[1].same_head_dp, result.layers[1].same_head_dp, rtol=1e-5)


MQA: dict = {}  # the multi-query checkpoint, built once per session


def _hooked(model, module, text, tokenizer):
    seen = {}
    handle = module.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out.detach()))
    try:
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen["out"][0].float().numpy()


def test_q_and_k_are_post_rotary(llama):
    """Rotary embeddings leave position 0 unchanged (cos 0 = 1, sin 0 = 0) and turn every later one."""
    proj = _hooked(llama.model, llama.model.layers[0].self_attn.q_proj, FIJI, llama.tokenizer)  # [pos, 8 * d]
    proj = proj.reshape(proj.shape[0], 8, -1).transpose(1, 0, 2)  # [head, pos, d_head]
    q = capture(llama, FIJI, pattern_layers=[]).q[0]
    np.testing.assert_allclose(q[:, 0], proj[:, 0], atol=1e-6)  # no rotation at position 0
    assert np.abs(q[:, 1:] - proj[:, 1:]).max() > 1e-2  # rotated everywhere else


def test_qwen3_q_and_k_are_post_qk_norm(family_paths, tmp_path_factory):
    loaded = load_model(str(build("qwen3", family_paths, tmp_path_factory)))
    attn = loaded.model.layers[0].self_attn
    normed = _hooked(loaded.model, attn.q_norm, FIJI, loaded.tokenizer).transpose(1, 0, 2)  # [head, pos, d_head]
    raw = _hooked(loaded.model, attn.q_proj, FIJI, loaded.tokenizer)  # [pos, head * d_head]
    raw = raw.reshape(raw.shape[0], loaded.info.n_heads, -1).transpose(1, 0, 2)  # [head, pos, d_head]
    q = capture(loaded, FIJI, pattern_layers=[]).q[0]
    np.testing.assert_allclose(q[:, 0], normed[:, 0], atol=1e-6)
    assert np.abs(q[:, 0] - raw[:, 0]).max() > 1e-2


def test_pythia_partial_rotary_leaves_the_last_dimensions_alone(family_paths, tmp_path_factory):
    loaded = load_model(str(build("gpt_neox", family_paths, tmp_path_factory)))
    info = loaded.info
    qkv = _hooked(loaded.model, loaded.model.layers[0].attention.query_key_value, FIJI, loaded.tokenizer)
    qkv = qkv.reshape(qkv.shape[0], info.n_heads, 3 * info.d_head).transpose(1, 0, 2)  # [head, pos, 3 * d_head]
    raw_q = qkv[..., : info.d_head]  # [head, pos, d_head]
    rotary = int(info.d_head * 0.25)
    q = capture(loaded, FIJI, pattern_layers=[]).q[0]
    np.testing.assert_allclose(q[..., rotary:], raw_q[..., rotary:], atol=1e-6)  # pass-through dimensions
    assert np.abs(q[:, 1:, :rotary] - raw_q[:, 1:, :rotary]).max() > 1e-2  # rotated dimensions


@pytest.mark.parametrize("name, window, layer", [("mistral", 8, 0), ("mistral", 8, 1), ("gemma2", 6, 0)])
def test_sliding_window_is_in_the_pattern(family_paths, tmp_path_factory, name, window, layer):
    loaded = load_model(str(build(name, family_paths, tmp_path_factory)))
    pattern = capture(loaded, FIJI).patterns[layer]  # [head, q_pos, k_pos]
    n = pattern.shape[-1]
    assert n > 2 * window
    too_far = np.tril(np.ones((n, n), dtype=bool), k=-window)  # keys at distance >= window
    assert pattern[:, too_far].max() == 0
    assert pattern[:, np.tril(np.ones((n, n), dtype=bool)) & ~too_far].min() > 0


def test_gemma2_soft_capping_scaling_and_global_layer(family_paths, tmp_path_factory):
    loaded = load_model(str(build("gemma2", family_paths, tmp_path_factory)))
    config = loaded.model.config
    captured = capture(loaded, FIJI)
    q, k = (torch.from_numpy(x[1]) for x in (captured.q, captured.k))  # layer 1: global attention
    n = q.shape[1]
    assert np.tril(captured.patterns[1], k=-config.sliding_window).max() > 0  # no window on the global layer
    causal = torch.ones(n, n).tril().bool()[None]  # [1, q_pos, k_pos]
    scaling = config.query_pre_attn_scalar ** -0.5
    assert config.query_pre_attn_scalar != loaded.info.d_head
    exact = compute_pattern(q, k, scaling, causal, config.attn_logit_softcapping).numpy()
    np.testing.assert_allclose(exact, captured.patterns[1], rtol=0, atol=EXACT)
    uncapped = compute_pattern(q, k, scaling, causal).numpy()
    wrong_scale = compute_pattern(q, k, loaded.info.d_head ** -0.5, causal, config.attn_logit_softcapping).numpy()
    assert np.abs(uncapped - exact).max() > 0.05  # the soft-cap bites in this config
    assert np.abs(wrong_scale - exact).max() > 1e-3


@pytest.mark.parametrize("name, first, special", [
    ("llama", "<s>", "first"), ("gemma2", "<bos>", "first"), ("bert", "[CLS]", "ends"),
    ("roberta", "<s>", "ends"), ("gpt2", None, "none"), ("qwen2", None, "none"),
])
def test_special_tokens_are_marked(family_paths, tmp_path_factory, name, first, special):
    loaded = load_model(str(build(name, family_paths, tmp_path_factory)))
    result = analyze(loaded, FIJI, layers=[0])
    n = result.n_tokens
    expected = {"first": (0,), "ends": (0, n - 1), "none": ()}[special]
    assert result.special_positions == expected
    assert result.to_dict()["special_positions"] == list(expected)
    if first is not None:
        assert result.tokens[0] == first
        assert result.first_token == first


def test_special_tokens_typed_in_the_text_are_marked(llama):
    """A literal </s> in the text becomes the EOS id: the model sees a special token, so the result says so."""
    result = analyze(llama, "The cat sat. </s> The dog", layers=[0])
    eos = [i for i, t in enumerate(result.token_ids) if t == llama.tokenizer.eos_token_id]
    assert eos and set(eos) <= set(result.special_positions)
    assert 0 in result.special_positions


def test_an_unknown_word_is_a_text_position_not_a_special_token(minilm, family_paths, tmp_path_factory):
    """[UNK] stands for a word the vocabulary lacks (MiniLM's for a snowman): it is no special token, so an encoder's
    default query is that last word and exclude_special_keys keeps it; a typed [SEP] stays special. Ground truth: the
    tokenizer's own special_tokens_mask (what it added) and the ids of the typed tokens. Before, every id in
    all_special_ids was special, [UNK] included, so the query moved to the word before it."""
    from analysis.pipeline import analyze_batch

    text = "the weather is nice [SEP] so nice ☃"
    encoded = minilm.tokenizer(text, return_special_tokens_mask=True)
    ids, added = np.array(encoded["input_ids"]), np.array(encoded["special_tokens_mask"], dtype=bool)
    unknown = np.flatnonzero(ids == minilm.tokenizer.unk_token_id)
    typed = np.flatnonzero(ids == minilm.tokenizer.sep_token_id)[:-1]  # the [SEP] in the text, not the appended one
    assert unknown.size == 1 and typed.size == 1 and not added[unknown].any()
    result = analyze(minilm, text, layers=[0], exclude_special_keys=True)
    assert result.special_positions == tuple(sorted({*np.flatnonzero(added).tolist(), *typed.tolist()}))
    assert result.query == unknown[0] == len(ids) - 2 and result.query_choice != "chosen"
    [batched] = analyze_batch(minilm, [text, "the weather"], layers=[0], exclude_special_keys=True)[:1]
    assert (batched.special_positions, batched.query) == (result.special_positions, result.query)
    # GPT-2's <|endoftext|> is its UNK as well as its BOS and EOS: typed, it stays special
    gpt2 = load_model(str(build("gpt2", family_paths, tmp_path_factory)))
    assert gpt2.tokenizer.unk_token_id == gpt2.tokenizer.eos_token_id
    marked = analyze(gpt2, "The cat<|endoftext|> sat", layers=[0])
    assert marked.special_positions == tuple(np.flatnonzero(np.array(marked.token_ids) == gpt2.tokenizer.eos_token_id))
    assert marked.special_positions


def half_precision_tolerances(q, k, q_half, k_half, pattern, query: int = -1,
                              causal: bool = True) -> dict[str, np.ndarray | float]:
    """{field: bound on |half - float32|} for one layer, from the float32 q [head, pos, d], k [kv_head, pos, d], the
    half model's (captured in float32 from the half-precision tensors) and the float32 pattern [head, q_pos, k_pos].

    stats (Q/K means and stds): a mean moves by at most the largest change of an element, a standard deviation by
      at most sqrt(N / (N - 1)) times it (Minkowski); float32 sums of N values add N u32 max|x|.
    dots (q.k): the exact change max |q_half.k_half - q.k| (float64), plus each side's float32 rounding,
      d u32 sum_i |q_i k_i| (Higham, Accuracy and Stability of Numerical Algorithms, 3.1).
    probabilities, entry by entry: the logits of one query row differ by at most delta = scaling * (that row's dot
      bound), with scaling <= 1 / sqrt(d_head) on every tested family (Gemma 2's query_pre_attn_scalar 24 > its
      d_head 16; its tanh soft-cap only shrinks differences). Each weight p of the row then becomes
      p' in [p exp(-2 delta), min(p exp(2 delta), 1)], so |p' - p| <= max(p (1 - exp(-2 delta)),
      min(p (exp(2 delta) - 1), 1 - p)), plus a few float32 roundings (8 u32) for exp and the normalisation.
      The read-outs take the same entries (final_to_prev: row `query`, its earlier keys if `causal`, else every
      other key; self_attention, first_self) or their mean (sink_mass).
    """
    u32 = EPS32 / 2
    q, k, q_half, k_half = (np.asarray(x, dtype=np.float64) for x in (q, k, q_half, k_half))
    n_rep = q.shape[0] // k.shape[0]

    def dot_bound(key, key_half) -> np.ndarray:  # every query head against every head of `key`
        exact = np.abs(np.einsum("hqd,gkd->hgqk", q_half, key_half) - np.einsum("hqd,gkd->hgqk", q, key))
        sums = np.einsum("hqd,gkd->hgqk", np.abs(q), np.abs(key))  # [head, key head, q_pos, k_pos]: sum |q_i k_i|
        return exact + 2 * q.shape[-1] * u32 * sums  # [head, key head, q_pos, k_pos]

    n_values = q.shape[1] * q.shape[2]  # positions x dimensions of one head
    change = max(np.abs(q_half - q).max(), np.abs(k_half - k).max())
    stats = np.sqrt(n_values / (n_values - 1)) * change + n_values * u32 * max(np.abs(q).max(), np.abs(k).max())
    every = dot_bound(k, k_half)  # [head, kv_head, q_pos, k_pos]: the notebook's dot products read every key head
    own = every[np.arange(q.shape[0]), np.arange(q.shape[0]) // n_rep]  # [head, q_pos, k_pos]: the key head read
    delta = own.max(axis=-1, keepdims=True) / np.sqrt(q.shape[-1])  # [head, q_pos, 1]: per query row
    p = np.asarray(pattern, dtype=np.float64)  # [head, q_pos, k_pos]
    entry = np.maximum(-p * np.expm1(-2 * delta), np.minimum(p * np.expm1(2 * delta), 1 - p)) + 8 * u32
    return {
        "q_means": stats, "q_stds": stats, "k_means": stats, "k_stds": stats, "same_head_dp": float(every.max()),
        "diff_head_dp": float(every.max()), "patterns": entry,
        "final_to_prev": np.delete(entry[:, query], np.s_[query % p.shape[1]:] if causal else query % p.shape[1],
                                   axis=-1).reshape(-1),  # [head * keys]: the query row less itself (and later)
        "self_attention": np.diagonal(entry[:, 1:, 1:], axis1=1, axis2=2).reshape(-1),  # [head * (pos - 1)]
        "first_self": entry[:, 0, 0], "sink_mass": entry[:, 1:, 0].mean(axis=1),  # [head], [head]
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_measures_in_float32_within_tolerance(family_path, dtype):
    name, path = family_path
    loaded = load_model(str(path))
    full_capture = capture(loaded, FIJI)
    full = summarize(full_capture, loaded.info.to_dict())
    half_model = load_model(str(path), dtype=dtype)
    assert half_model.model.dtype == getattr(torch, dtype)
    half_capture = capture(half_model, FIJI)
    half = summarize(half_capture, half_model.info.to_dict())
    assert half.model["dtype"] == dtype
    u = float(torch.finfo(getattr(torch, dtype)).eps) / 2
    for layer, expected in full.layers.items():
        measured = half.layers[layer]
        assert measured.parity_max_abs_err <= PARITY_TOLERANCE[dtype], (name, layer, measured.parity_max_abs_err)
        assert measured.patterns.dtype == np.float32
        q, k, q_half, k_half = (c[layer] for c in (full_capture.q, full_capture.k, half_capture.q, half_capture.k))
        for ours, theirs in ((q_half, q), (k_half, k)):  # the half model's own rounding, counted above
            bound = (ROUNDINGS_PER_LAYER * layer + ROUNDINGS_OWN) * u * np.abs(theirs).max()
            assert np.abs(ours - theirs).max() <= bound, (name, dtype, layer, bound)
        assert half.query == full.query  # the same query token: the last word of an encoder, else the final token
        tolerances = half_precision_tolerances(q, k, q_half, k_half, expected.patterns, full.query,
                                               loaded.info.causal)
        assert sorted(tolerances) == sorted(ARRAY_FIELDS + ("patterns",))
        for field, tolerance in tolerances.items():
            want, got = getattr(expected, field), getattr(measured, field)
            assert want.shape == got.shape, (name, dtype, layer, field)
            assert np.all(np.abs(got - want) <= tolerance), (name, dtype, layer, field, np.max(tolerance))


def test_long_input_at_max_positions_keeps_q_and_k_for_every_layer(llama):
    """128 positions (the checkpoint's maximum): q and k for both layers, a T x T pattern only for the one asked."""
    limit = llama.info.max_positions
    text = " ".join(["cat"] * (limit - 1))  # BOS + one token per word
    assert len(llama.tokenizer(text)["input_ids"]) == limit
    captured = capture(llama, text, pattern_layers=[1])
    assert [q.shape[1] for q in captured.q] == [limit, limit]
    assert [k.shape for k in captured.k] == [(2, limit, llama.info.d_head)] * 2
    assert list(captured.patterns) == [1] and captured.patterns[1].shape == (8, limit, limit)
    assert captured.parity[1] <= EXACT
    with pytest.raises(HeadscopeError, match=f"accepts at most {limit}"):
        capture(llama, text + " cat", pattern_layers=[1])


def test_roberta_counts_positions_past_its_padding_index(family_paths, tmp_path_factory):
    """RoBERTa's first token is position padding_idx + 1 = 2: its 130 position embeddings hold 128 tokens, and a
    left-padded batch must start each text's position ids there (from 0, every text of the batch was measured with
    wrong position embeddings; and 129 tokens passed the length check, then crashed the model)."""
    from analysis import analyze_batch

    loaded = load_model(str(build("roberta", family_paths, tmp_path_factory)))
    assert loaded.model.config.max_position_embeddings == 130 and loaded.info.max_positions == 128
    text = " ".join(["cat"] * 126)  # <s> + one token per word + </s>
    assert len(loaded.tokenizer(text)["input_ids"]) == 128
    analyze(loaded, text, layers=[0])
    with pytest.raises(HeadscopeError, match="accepts at most 128"):
        analyze(loaded, text + " cat", layers=[0])
    loaded.tokenizer.padding_side = "left"
    texts = [FIJI, "the cat", "Mary and John went to the store."]
    for got, text in zip(analyze_batch(loaded, texts, layers=[0, 1]), texts):
        want = analyze(loaded, text, layers=[0, 1])
        for layer in (0, 1):
            np.testing.assert_allclose(got.layers[layer].q_means, want.layers[layer].q_means, atol=1e-6)
            np.testing.assert_allclose(got.layers[layer].final_to_prev, want.layers[layer].final_to_prev, atol=1e-6)


def test_device_map_auto_loads_through_accelerate(llama_path, llama):
    mapped = load_model(str(llama_path), device_map="auto")
    assert mapped.info.device_map == "auto"
    assert mapped.info.device == str(mapped.model.get_input_embeddings().weight.device)
    want, got = analyze(llama, FIJI), analyze(mapped, FIJI)
    for layer in want.layers:
        np.testing.assert_array_equal(got.layers[layer].patterns, want.layers[layer].patterns)
        assert got.layers[layer].parity_max_abs_err <= EXACT
    with pytest.raises(HeadscopeError, match="Unknown device map"):
        load_model(str(llama_path), device_map="balanced_low_0")


def test_cli_device_map_auto(llama_path, tmp_path, capsys):
    import json

    from reports.__main__ import main

    out = tmp_path / "r.json"
    assert main(["--model", str(llama_path), "--device-map", "auto", "--dtype", "bfloat16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"]["family"] == "Llama" and data["model"]["dtype"] == "bfloat16"
    assert data["layers"]["1"]["parity_max_abs_err"] <= PARITY_TOLERANCE["bfloat16"]


def test_unsupported_architecture_names_it_and_every_family(t5_path, tmp_path, capsys):
    from reports.__main__ import main

    with pytest.raises(HeadscopeError) as error:
        load_model(str(t5_path))
    assert main(["--model", str(t5_path), "--json", str(tmp_path / "o.json")]) == 2
    cli = capsys.readouterr().err.strip().splitlines()
    assert len(cli) == 1 and cli[0] == f"headscope: error: {error.value}"
    for needle in ["T5Model", "'t5'", *(family for family, _ in FAMILIES.values())]:
        assert needle in str(error.value)


def test_the_sdpa_route_rebuilds_what_the_fused_kernel_used(family_path):
    """The fused kernel's pass (the GPU default): the rebuilt pattern times v equals the attention output sdpa
    returned on every layer, and every number stays within sdpa's rounding of the eager pass's."""
    name, path = family_path
    loaded = load_model(str(path))
    eager = analyze(loaded, FIJI, attention="eager")
    fused = analyze(loaded, FIJI, attention="sdpa")
    assert sorted(fused.layers) == list(range(loaded.info.n_layers))
    for layer, want in eager.layers.items():
        got = fused.layers[layer]
        assert got.parity_max_abs_err <= EXACT, (name, layer, got.parity_max_abs_err)
        for field in ARRAY_FIELDS:
            scale = max(1.0, float(np.abs(getattr(want, field)).max(initial=0)))
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=0, atol=1e-4 * scale,
                                       err_msg=f"{name} layer {layer} {field}")
    for score, values in eager.head_scores.items():
        np.testing.assert_allclose(fused.head_scores[score], values, atol=1e-4, err_msg=score)


def test_a_gpus_settings_on_the_cpu_give_the_cpus_numbers(family_path, monkeypatch):
    """Everything a GPU changes, at once on the CPU (no GPU runs in the tests): the fused kernel with sdpa's masks,
    the entropy from the pattern, the torch KDE (windowed) and Mann-Whitney ranks, a GPU's blocks, layer groups,
    immediate measuring and early copies to the host. Every number stays within sdpa's rounding of the CPU's."""
    import importlib

    from analysis.results import DP_ARRAYS

    name, path = family_path
    loaded = load_model(str(path))
    expected = analyze(loaded, FIJI)  # the CPU's routes
    capture_module, metrics, patterns = (importlib.import_module(f"analysis.{module}")
                                         for module in ("capture", "metrics", "patterns"))
    monkeypatch.setattr(metrics, "NUMPY_ON_CPU", False)
    for budget in ("WORK_BUDGET", "GROUP_BUDGET", "HOLD_BUDGET", "PENDING_BUDGET"):
        monkeypatch.setitem(getattr(capture_module, budget), "cpu", getattr(capture_module, budget)["cuda"])
    monkeypatch.setitem(capture_module.PENDING_BUDGET, "cpu", 1)  # tiny models: a copy after every group
    monkeypatch.setitem(patterns.ENTROPY_FROM_SCORES, "cpu", patterns.ENTROPY_FROM_SCORES["cuda"])
    monkeypatch.setattr(patterns, "CAUSAL_ROWS", 2**30)
    got = analyze(loaded, FIJI, attention="sdpa")
    assert sorted(got.layers) == sorted(expected.layers)
    for layer, want in expected.layers.items():
        have = got.layers[layer]
        assert have.parity_max_abs_err <= EXACT, (name, layer)
        for field in (*ARRAY_FIELDS, *DP_ARRAYS):
            source = (have, want) if field in ARRAY_FIELDS else (have.dp_stats, want.dp_stats)
            wanted = getattr(source[1], field)
            scale = max(1.0, float(np.abs(wanted).max(initial=0)))
            np.testing.assert_allclose(getattr(source[0], field), wanted, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"{name} layer {layer} {field}")
        assert (have.kde is None) == (want.kde is None), (name, layer)
        for curve in () if want.kde is None else ("final_to_prev", "self_attention"):
            np.testing.assert_allclose(have.kde[curve], want.kde[curve], rtol=0, atol=1e-3, err_msg=curve)
        assert_layer_rank_statistics_close(have, want, where=f"{name} layer {layer}", rel=2e-4)  # equal but for
        # pairs of dot products within twice the arrays' tolerance above: two, each moved that far, can swap
    for score, values in expected.head_scores.items():
        np.testing.assert_allclose(got.head_scores[score], values, rtol=0, atol=1e-4, err_msg=score)


@pytest.mark.parametrize("name, masks", [("llama", {"none"}), ("mistral", {"bool"}), ("gemma2", {"float32"})])
def test_the_fused_route_gets_sdpas_masks_and_rebuilds_them(family_paths, tmp_path_factory, monkeypatch, name, masks):
    """On the fused route the kernel gets sdpa's own masks: None where its causal flag does the masking (no T x T
    mask in memory), boolean for a sliding window shorter than the text; a soft-capping model keeps eager's
    additive masks (it runs eager attention). The rebuild reads each: parity holds and the window stays."""
    import importlib

    from analysis.capture import capture_input, text_input

    recorder_class = importlib.import_module("analysis.capture")._Recorder
    loaded = load_model(str(build(name, family_paths, tmp_path_factory)))
    seen = set()
    record = recorder_class.record

    def spy(self, query, key, value, attention_mask, *args):
        seen.add("none" if attention_mask is None else str(attention_mask.dtype).removeprefix("torch."))
        return record(self, query, key, value, attention_mask, *args)

    monkeypatch.setattr(recorder_class, "record", spy)
    captured = capture_input(loaded, text_input(loaded, FIJI), keep_patterns=True, attention="sdpa")
    assert seen == masks
    window = getattr(loaded.model.config, "sliding_window", None)
    for layer, pattern in captured.patterns.items():
        assert captured.parity[layer] <= EXACT, (name, layer)
        n = pattern.shape[-1]
        assert pattern[:, np.triu(np.ones((n, n), dtype=bool), k=1)].max() == 0  # causal
        if name == "mistral":
            assert n > 2 * window and pattern[:, np.tril(np.ones((n, n), dtype=bool), k=-window)].max() == 0
    if name == "gemma2":  # a soft-capping model the mask function did not recognise fails loudly, not unmasked
        monkeypatch.setattr(loaded.model.config, "attn_logit_softcapping", None)
        with pytest.raises(HeadscopeError, match="attention='eager'"):
            capture_input(loaded, text_input(loaded, FIJI), attention="sdpa")


@pytest.mark.parametrize("name", ["gpt_neox", "llama"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sdpa_route_parity_in_half_precision_is_within_tolerance(family_paths, tmp_path_factory, name, dtype):
    """In half precision the output parity is the kernel's rounding of its output (worst seen: gpt_neox bfloat16
    0.020, float16 0.0023)."""
    loaded = load_model(str(build(name, family_paths, tmp_path_factory)), dtype=dtype)
    result = analyze(loaded, FIJI, attention="sdpa")
    for layer, measured in result.layers.items():
        assert 0 < measured.parity_max_abs_err <= PARITY_TOLERANCE[dtype], (name, dtype, layer)


# ---- the config decides the attention: is_causal, is_decoder, Gemma 2's use_bidirectional_attention ------------------

# Configs whose masks differ from their family's default in transformers 5.x (loading.attention_is_causal). Which way
# each one attends is read from the model's own eager attention, never from this table. softcap=None: the sdpa route
# runs the fused kernel (Gemma 2's soft-capping keeps it on eager attention).
ATTENTION_CONFIGS = {
    # a decoder used as an encoder: bidirectional masks, a sliding layer |q - k| <= window (config.is_causal False)
    "gemma2-encoder": lambda p: checkpoints.tiny_gemma2(p, use_bidirectional_attention=True, is_causal=False),
    "gemma2-encoder-fused": lambda p: checkpoints.tiny_gemma2(p, softcap=None, use_bidirectional_attention=True,
                                                              is_causal=False),
    # the flag alone: the attention modules' is_causal goes, the masks stay causal (the kernel must follow the masks)
    "gemma2-flag-only": lambda p: checkpoints.tiny_gemma2(p, softcap=None, use_bidirectional_attention=True),
    "llama-encoder": lambda p: checkpoints.tiny_llama(p, is_causal=False),
    "mistral-encoder": lambda p: checkpoints.tiny_mistral(p, is_causal=False),  # a bidirectional window, every layer
    "bert-decoder": lambda p: checkpoints.tiny_bert(p, n_layer=2, n_head=4, hidden=32, is_decoder=True),
}


@pytest.fixture(scope="module")
def attention_config_paths(tmp_path_factory):
    paths = {}

    def path(name):
        if name not in paths:
            paths[name] = ATTENTION_CONFIGS[name](tmp_path_factory.mktemp(f"tiny-{name}"))
        return paths[name]
    return path


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(ATTENTION_CONFIGS))
def test_the_attention_follows_the_config(attention_config_paths, name, attention):
    """ModelInfo.causal is what the model's own eager attention does; on both routes every layer's pattern (full and
    sliding) is that attention and parity holds; the default query is an encoder's (the last non-special token: the
    text ends with EOS or [SEP]) or a causal model's (the final token), and the windows are the keys a query sees.
    Before, every such checkpoint was measured as its family's default: an encoder's patterns cut at the causal edge
    (parity ~1), and Gemma 2's flag alone ran the fused kernel bidirectionally under causal masks (parity 1.29)."""
    from analysis.capture import QUERY_DEFAULTS, resolve_query, text_input

    path = attention_config_paths(name)
    loaded = load_model(str(path))
    text = FIJI + (loaded.tokenizer.eos_token or "")  # BERT's tokenizer appends [SEP] itself
    _, expected = eager_attentions(path, loaded, text)  # per layer [head, q_pos, k_pos]
    causal = not any(np.triu(weights > 0, k=1).any() for weights in expected)  # the model's own attention
    assert loaded.info.causal == causal
    seen = [(weights > 0).sum(axis=-1).max() for weights in expected]  # per layer: the most keys a query sees
    n = expected[0].shape[-1]
    windows = loaded.info.attention_windows or (None,) * loaded.info.n_layers
    assert [n if window is None else window for window in windows] == seen
    result = analyze(loaded, text, keep_patterns=True, attention=attention)
    for layer in range(loaded.info.n_layers):
        assert result.layers[layer].parity_max_abs_err <= EXACT, (name, attention, layer)
        np.testing.assert_allclose(result.layers[layer].patterns, expected[layer], rtol=0, atol=EXACT)
    special = text_input(loaded, text).special  # [pos]
    assert special[-1] and not special[-2]
    assert (result.query, result.query_choice) == resolve_query(special, causal)
    assert result.query_choice == QUERY_DEFAULTS[causal]
