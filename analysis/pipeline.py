"""The pipeline: texts -> one forward pass per batch -> AnalysisResult per text.

`analyze`/`analyze_ids`/`analyze_batch` measure inside the pass on the model's device (analysis.capture in
measuring mode); `summarize` measures a kept `Capture` (q and k on the host) with the same torch functions on
the CPU, for the app's layer changes without a model call. Both end in `layer_result`, so both give the same
numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from analysis.capture import (
    READOUTS,
    Capture,
    TextInput,
    _Text,
    ids_input,
    pattern_bytes,
    resolve_query,
    run_pass,
    text_input,
    text_inputs,
    token_strings,
)
from analysis.errors import HeadscopeError
from analysis.head_scores import combine_score_parts
from analysis.loading import LoadedModel
from analysis.metrics import (
    compared_keys,
    compute_layer_measures_t,
    compute_mannwhitney,
    kde_grid,
    mannwhitney_from_parts,
    query_keys,
)
from analysis.parity import layer_parity, parity_warning
from analysis.patterns import to_host
from analysis.results import MODEL_KEYS, AnalysisResult, DpStats, LayerResult

ONE_TOKEN = "The text has only 1 token: the dot products and the KDE need at least 2, so those fields are empty."
SHORT_TEXT = ("The text has only 2 tokens, and its query token has no key left to compare with, so the dot products "
              "are empty: use a longer text{keep}.")
LAYER_RANGE = "Layer {layer} is out of range: this model has layers 0..{last}."
PATTERNS_DROPPED = ("The attention patterns ({mib:.0f} MiB) were not kept, only their read-outs, so there are no "
                    "heatmaps: ask for them with --patterns or --html (then kept whatever their size), or analyse "
                    "fewer layers.")
NO_QUERY_KEYS = ("The query token {p} ({token}) has no keys to compare with (the first token, the query "
                 "itself{special} are left out), so the dot products are empty: choose a later query token.")
QUERY_NEEDS_PATTERN = ("Layer {layer}'s pattern was not kept, so its read-out for query token {p} cannot be computed "
                       "without running the model again: capture with query_position={p}{special}.")
BAD_BATCH_SIZE = "The batch size must be at least 1, not {size}."
OUT_OF_MEMORY = "The text of {n} tokens does not fit in the device's memory even alone: shorten it."
BATCH_SIZE = 16  # texts per forward pass by default
PROBE_LENGTH = 50
PROBE_TOO_LONG = ("An induction probe of {length} tokens repeated twice ({n} tokens with special tokens) is longer "
                  "than the {limit} positions {model} accepts: choose a length of at most {most}.")
PROBE_TOO_SHORT = "The induction probe needs a length of at least 2 tokens, not {length}."


def default_layer(n_layers: int) -> int:
    """The notebook's layer 6, or the middle layer of a model with 6 layers or fewer."""
    return 6 if n_layers > 6 else n_layers // 2


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """The requested layers, sorted and deduplicated; None means every layer."""
    if layers is None:
        return list(range(n_layers))
    chosen = sorted(set(layers))
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise HeadscopeError(LAYER_RANGE.format(layer=layer, last=n_layers - 1))
    return chosen


def measured_mannwhitney(host: dict, key, same: np.ndarray, diff: np.ndarray) -> tuple[float | None, float | None]:
    """(p, rank-biserial r) of same vs diff: from the U and tie term the device ranked (`host[key]`) where it did,
    else compute_mannwhitney on the host."""
    if same.size == 0 or diff.size == 0:
        return None, None
    if key in host:  # large groups: U and the tie term came from the device
        u1, tie_sum = host[key]
        return mannwhitney_from_parts(float(u1), float(tie_sum), same.size, diff.size)
    return compute_mannwhitney(same, diff)  # small groups: scipy's exact test


def layer_result(get: dict, parity: float, pattern: np.ndarray | None = None,
                 score_max: float | None = None) -> LayerResult:
    """One layer's LayerResult from its host numbers {name: array} (metrics.compute_layer_measures_t's names
    and the READOUTS); `score_max`: what its parity tolerance scales with (half precision), if measured."""
    p, r = measured_mannwhitney(get, "mannwhitney", get["same_head_dp"], get["diff_head_dp"])
    p_c, r_c = measured_mannwhitney(get, "mannwhitney_centered", get["same_head_dp_centered"],
                                    get["diff_head_dp_centered"])
    dp_stats = DpStats(mannwhitney_p=p, rank_biserial=r, same_head_dp_centered=get["same_head_dp_centered"],
                       diff_head_dp_centered=get["diff_head_dp_centered"], mannwhitney_p_centered=p_c,
                       rank_biserial_centered=r_c)
    kde = None
    curves = {name: get.get("kde_" + name) for name in ("final_to_prev", "self_attention")}
    if all(curve is not None and np.isfinite(curve).all() for curve in curves.values()):
        kde = {"grid": kde_grid(), **curves}
    return LayerResult(q_means=get["q_means"], q_stds=get["q_stds"], k_means=get["k_means"], k_stds=get["k_stds"],
                       same_head_dp=get["same_head_dp"], diff_head_dp=get["diff_head_dp"],
                       **{name: get[name] for name in READOUTS}, parity_max_abs_err=float(parity), kde=kde,
                       patterns=pattern, dp_stats=dp_stats,
                       parity_score_max=None if score_max is None else float(score_max))


def compute_layer_result(q, k, summaries: dict, parity: float, exclude_first_token: bool,
                         pattern=None, *, query_position: int = -1, causal: bool = True, skip=None,
                         score_max: float | None = None) -> LayerResult:
    """Every measurement of one layer from its captured q [head, pos, d], k [kv_head, pos, d] (numpy) and the
    read-outs of its pattern; computed by the device functions on the CPU. `pattern` is kept if given. The dot
    products' query and keys: metrics.compared_keys(query_position, causal=, skip=)."""
    readouts = {name: torch.from_numpy(np.asarray(values)) for name, values in summaries.items()}
    found = compute_layer_measures_t(torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(k)), readouts,
                                     exclude_first_token, query_position, causal=causal, skip=skip)
    host = to_host(found)
    host.update({name: np.asarray(values, dtype=np.float64) for name, values in summaries.items()})
    return layer_result(host, parity, pattern, score_max)


def check_parity(layers: dict[int, LayerResult], dtype: str) -> tuple[str, ...]:
    """The parity warning naming the layers above their tolerance (analysis.parity), if any."""
    errors, score_max = layer_parity(layers)
    warning = parity_warning(errors, dtype, score_max)
    return () if warning is None else (warning,)


def bos_present(special) -> bool:
    """Whether position 0 is a special token (BOS, CLS, <|endoftext|>): what exclude_bos leaves out. A GPT-2 text
    starts with its first word, which stays."""
    special = np.asarray(special, dtype=bool)  # [pos]
    return bool(special.size and special[0])


def _result(model: dict, text: str, tokens, token_ids, special, layers: dict[int, LayerResult], n_dropped_mib,
            score_parts, score_fixed, exclude_first_token, exclude_current_token, induction_probe, *,
            query: tuple[int, str] | None = None, exclude_special_keys: bool = False,
            exclude_bos: bool = True) -> AnalysisResult:
    """`n_dropped_mib`: the size of the patterns that were wanted but not kept (a warning), else None.
    `query`: (absolute query position, how it was chosen); None: the final token."""
    n = len(tokens)
    p, how = (n - 1, "the final token") if query is None else query
    _, keys = compared_keys(n, exclude_first_token, p, causal=bool(model.get("causal", True)),
                            skip=np.asarray(special, dtype=bool) if exclude_special_keys else None)
    n_keys = len(range(n)[keys] if isinstance(keys, slice) else keys)  # the query's dot-product keys
    warnings = []  # two tokens have a KDE, as in the notebook: of every head's weights
    if n == 1:
        warnings.append(ONE_TOKEN)
    elif n == 2 and n_keys == 0:
        warnings.append(SHORT_TEXT.format(keep=", or keep the first token" if exclude_first_token else ""))
    elif n_keys == 0:
        warnings.append(NO_QUERY_KEYS.format(p=p, token=repr(tokens[p]),
                                             special=", the special tokens" if exclude_special_keys else ""))
    bos_excluded = exclude_bos and bos_present(special)
    if n_dropped_mib is not None:
        warnings.append(PATTERNS_DROPPED.format(mib=n_dropped_mib))
    warnings.extend(check_parity(layers, model["dtype"]))
    return AnalysisResult(
        model={key: model.get(key) for key in MODEL_KEYS},
        text=text,
        tokens=tokens,
        token_ids=token_ids,
        special_positions=tuple(int(i) for i in np.asarray(special).nonzero()[0]),
        exclude_first_token=exclude_first_token,
        layers=layers,
        warnings=tuple(warnings),
        head_scores={} if score_parts is None else combine_score_parts(
            score_parts, score_fixed, bos_excluded, exclude_current_token),
        exclude_current_token=exclude_current_token,
        induction_probe=induction_probe,
        query_position=p,
        query_choice=how,
        exclude_special_keys=exclude_special_keys,
        exclude_bos=exclude_bos,
        bos_excluded=bos_excluded,
    )


def summarize(captured: Capture, model: dict, layers: Iterable[int] | None = None,
              exclude_first_token: bool = True, exclude_current_token: bool = False,
              induction_probe: dict | None = None, patterns_wanted: bool = False, *,
              query_position: int | None = None, exclude_special_keys: bool = False,
              exclude_bos: bool = True) -> AnalysisResult:
    """Measurements for `layers` (default: every layer whose pattern was read); no model call.

    A warning says when patterns were wanted (`patterns_wanted`) but not kept, and when a layer fails parity.

    The head scores cover every layer whatever `layers` is; `exclude_bos` leaves position 0 out of them when it
    is a special token. The query token (`query_position`, capture.resolve_query) and the exclusions are all
    applied here, so changing them needs no new forward pass: the dot products come from the kept q and k, the
    query's read-out from the capture's own row or, for another row, from the kept pattern (HeadscopeError if
    that layer's pattern was not kept).
    """
    chosen = sorted(captured.summaries) if layers is None else check_layers(layers, len(captured.q))
    missing = [layer for layer in chosen if layer not in captured.summaries]
    if missing:
        raise HeadscopeError(f"Layer(s) {missing} were not captured with attention patterns.")
    dropped = patterns_wanted and any(layer not in captured.patterns for layer in chosen)
    n = len(captured.tokens)
    causal = bool(model.get("causal", True))
    p, how = resolve_query(captured.special, causal, query_position)
    skip = np.asarray(captured.special, dtype=bool) if exclude_special_keys else None  # [pos]
    captured_p = n - 1 if captured.query_position is None else captured.query_position
    same_row = p == captured_p and (skip is None) == (captured.key_skip is None) and (
        skip is None or np.array_equal(skip, captured.key_skip))

    def readouts(layer: int) -> dict:
        summary = captured.summaries[layer]
        if same_row:
            return summary
        if layer not in captured.patterns:
            raise HeadscopeError(QUERY_NEEDS_PATTERN.format(  # the capture's own row needs its key exclusions too
                layer=layer, p=p, special="" if skip is None else ", exclude_special_keys=True"))
        _, keys = query_keys(n, p, causal=causal, skip=skip)
        row = captured.patterns[layer][:, p]  # [head, k_pos]
        return {**summary, "final_to_prev": row[:, keys].reshape(-1)}  # [head * keys]

    return _result(model, captured.text, captured.tokens, captured.token_ids, captured.special,
                   {layer: compute_layer_result(captured.q[layer], captured.k[layer], readouts(layer),
                                                captured.parity[layer], exclude_first_token,
                                                captured.patterns.get(layer), query_position=p, causal=causal,
                                                skip=skip, score_max=captured.parity_score_max.get(layer))
                    for layer in chosen},
                   pattern_bytes(model["n_heads"], n, len(chosen)) / 2**20 if dropped else None,
                   captured.score_parts, captured.score_fixed, exclude_first_token, exclude_current_token,
                   induction_probe, query=(p, how), exclude_special_keys=exclude_special_keys,
                   exclude_bos=exclude_bos)


def _measured(loaded: LoadedModel, item: TextInput, text: _Text, chosen: list[int], exclude_first_token: bool,
              exclude_current_token: bool, induction_probe: dict | None, keep_layers=None,
              keep_patterns: bool | None = None, query: tuple[int, str] | None = None,
              exclude_special_keys: bool = False, exclude_bos: bool = True) -> AnalysisResult:
    host, n_layers = text.host, loaded.info.n_layers
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for (layer, name), values in host.items():
        by_layer.setdefault(layer, {})[name] = values
    model = loaded.info.to_dict()
    shown = chosen if keep_layers is None else sorted(set(keep_layers))
    dropped = keep_patterns is None and any(layer not in text.patterns for layer in shown)  # None: kept if they fit
    return _result(model, item.text, token_strings(loaded.tokenizer, item.ids), item.ids, item.special,
                   {layer: layer_result(by_layer[layer], host[layer, "parity"], text.patterns.get(layer),
                                        by_layer[layer].get("score_max")) for layer in chosen},
                   pattern_bytes(model["n_heads"], item.ids.size, len(shown)) / 2**20 if dropped else None,
                   np.stack([host[layer, "parts"] for layer in range(n_layers)]),  # [layer, head, 4, 4]
                   np.stack([host[layer, "fixed"] for layer in range(n_layers)]),  # [layer, head, 3]
                   exclude_first_token, exclude_current_token, induction_probe, query=query,
                   exclude_special_keys=exclude_special_keys, exclude_bos=exclude_bos)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _measure_inputs(loaded: LoadedModel, items: list[TextInput], chosen: list[int], exclude_first_token: bool,
                    exclude_current_token: bool, keep_patterns: bool | None, induction_probe: dict | None = None,
                    attention: str = "auto", keep_layers=None, *, query_position: int | None = None,
                    exclude_special_keys: bool = False,
                    exclude_bos: bool = True) -> list[AnalysisResult | HeadscopeError]:
    """One padded pass over `items`; a batch the device cannot hold is split in halves, not crashed."""
    queries = [resolve_query(item.special, loaded.info.causal, query_position) for item in items]
    options = {"query_position": query_position, "exclude_special_keys": exclude_special_keys,
               "exclude_bos": exclude_bos}
    try:
        texts = run_pass(loaded, items, chosen, keep_patterns, keep_qk=False, measure=True,
                         exclude_first_token=exclude_first_token, attention=attention, keep_layers=keep_layers,
                         queries=[(p, item.special.copy() if exclude_special_keys else None)
                                  for item, (p, _) in zip(items, queries)])
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            return [HeadscopeError(OUT_OF_MEMORY.format(n=items[0].ids.size))]
        half = len(items) // 2
        return [*_measure_inputs(loaded, items[:half], chosen, exclude_first_token, exclude_current_token,
                                 keep_patterns, induction_probe, attention, keep_layers, **options),
                *_measure_inputs(loaded, items[half:], chosen, exclude_first_token, exclude_current_token,
                                 keep_patterns, induction_probe, attention, keep_layers, **options)]
    return [_measured(loaded, item, text, chosen, exclude_first_token, exclude_current_token, induction_probe,
                      keep_layers, keep_patterns, query, exclude_special_keys, exclude_bos)
            for item, text, query in zip(items, texts, queries)]


def analyze_batch(loaded: LoadedModel, texts: Sequence[str], batch_size: int = BATCH_SIZE,
                  layers: Iterable[int] | None = None, exclude_first_token: bool = True,
                  exclude_current_token: bool = False, keep_patterns: bool | None = False,
                  attention: str = "auto", keep_layers: Iterable[int] | None = None,
                  progress=None, *, query_position: int | None = None, exclude_special_keys: bool = False,
                  exclude_bos: bool = True) -> list[AnalysisResult | HeadscopeError]:
    """`analyze` of many texts, `batch_size` texts per forward pass: one result per text, in order, or the
    HeadscopeError of a text that cannot be analysed (empty, too long, ...); the others are unaffected.

    Texts are grouped by length (less padding) and padded on the tokenizer's padding side; each text is measured
    on its own positions only, so its result equals its single-text `analyze` (to float rounding). Patterns are
    not kept by default (keep_patterns=None: while they fit PATTERN_BUDGET, per text). `attention`: the route of
    the pass (capture.ATTENTION_ROUTES; "auto": sdpa on a GPU, eager on the CPU up to capture.EAGER_BUDGET).
    `keep_layers`: of `layers`,
    those whose patterns are kept (default: all of them). `progress(done, total)` after each batch.
    `query_position`, `exclude_special_keys`, `exclude_bos`: as `analyze`, per text (a negative position counts
    from each text's end; a text too short for it gets its HeadscopeError).
    """
    if batch_size < 1:
        raise HeadscopeError(BAD_BATCH_SIZE.format(size=batch_size))
    chosen = check_layers(layers, loaded.info.n_layers)
    kept = None if keep_layers is None else check_layers(keep_layers, loaded.info.n_layers)
    out: list[AnalysisResult | HeadscopeError | None] = [None] * len(texts)
    items = {}
    for index, item in enumerate(text_inputs(loaded, list(texts))):
        try:
            if isinstance(item, HeadscopeError):
                raise item
            resolve_query(item.special, loaded.info.causal, query_position)
            items[index] = item
        except HeadscopeError as exc:
            out[index] = exc
    order = sorted(items, key=lambda index: items[index].ids.size)  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        results = _measure_inputs(loaded, [items[index] for index in group], chosen, exclude_first_token,
                                  exclude_current_token, keep_patterns, attention=attention,
                                  keep_layers=kept, query_position=query_position,
                                  exclude_special_keys=exclude_special_keys, exclude_bos=exclude_bos)
        for index, result in zip(group, results):
            out[index] = result
        if progress is not None:
            progress(min(len(order), start + batch_size), len(order))
    return out


def _one(result: AnalysisResult | HeadscopeError) -> AnalysisResult:
    if isinstance(result, HeadscopeError):
        raise result
    return result


def analyze(loaded: LoadedModel, text: str, layers: Iterable[int] | None = None,
            exclude_first_token: bool = True, exclude_current_token: bool = False,
            keep_patterns: bool | None = None, attention: str = "auto", *, query_position: int | None = None,
            exclude_special_keys: bool = False, exclude_bos: bool = True) -> AnalysisResult:
    """One forward pass, then every measurement for `layers` (None: every layer) and every head's scores.

    Measured on the model's device inside the pass; each requested layer's T x T pattern is rebuilt in blocks
    of query rows and reduced to its read-outs; the patterns themselves (heatmaps, --patterns) are kept when
    `keep_patterns`, by default (None) while they fit in PATTERN_BUDGET.

    `query_position`: the query token of the dot products and the query read-out (negative: from the end; None:
    the final token of a causal model, the last non-special token of an encoder). `exclude_first_token` leaves
    position 0 out of the Q/K statistics and the dot products (the notebook's switch); `exclude_special_keys`
    leaves the special tokens out of the query's keys (dot products and read-out); `exclude_bos` leaves
    position 0 out of the head scores when it is a special token (BOS, CLS), as TransformerLens's exclude_bos.
    """
    chosen = check_layers(layers, loaded.info.n_layers)
    [result] = _measure_inputs(loaded, [text_input(loaded, text)], chosen, exclude_first_token,
                               exclude_current_token, keep_patterns, attention=attention,
                               query_position=query_position, exclude_special_keys=exclude_special_keys,
                               exclude_bos=exclude_bos)
    return _one(result)


def analyze_ids(loaded: LoadedModel, token_ids, layers: Iterable[int] | None = None,
                exclude_first_token: bool = True, exclude_current_token: bool = False,
                induction_probe: dict | None = None, keep_patterns: bool | None = None,
                attention: str = "auto", *, query_position: int | None = None, exclude_special_keys: bool = False,
                exclude_bos: bool = True) -> AnalysisResult:
    """As `analyze`, for token ids fed to the model as they are (no special tokens added)."""
    chosen = check_layers(layers, loaded.info.n_layers)
    [result] = _measure_inputs(loaded, [ids_input(loaded, token_ids)], chosen, exclude_first_token,
                               exclude_current_token, keep_patterns, induction_probe, attention=attention,
                               query_position=query_position, exclude_special_keys=exclude_special_keys,
                               exclude_bos=exclude_bos)
    return _one(result)


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text, e.g. ([CLS], [SEP]) or ([<s>], [])."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def induction_probe_ids(loaded: LoadedModel, length: int = PROBE_LENGTH, seed: int = 0) -> np.ndarray:
    """A seeded random sequence of `length` tokens, repeated twice: [pos] token ids.

    As TransformerLens's induction benchmark: an induction head, at a token of the second copy, attends to
    the token that followed the same token in the first copy, which on random tokens only induction can
    predict. The tokens are drawn without replacement from the vocabulary less its special tokens (with
    replacement only if the vocabulary is smaller than `length`), so each token of the second copy has
    exactly one earlier occurrence (and, seen by an encoder, each token of the first copy one later one). The
    tokenizer's own special tokens go around the repeat ([CLS] ... [SEP] for BERT, <s> for Llama); a tokenizer that
    adds none but has a BOS token gets it first, as TransformerLens prepends BOS to GPT-2's input.
    """
    if length < 2:
        raise HeadscopeError(PROBE_TOO_SHORT.format(length=length))
    tokenizer = loaded.tokenizer
    before, after = _special_ends(tokenizer)
    if not before and not after and tokenizer.bos_token_id is not None:
        before = [tokenizer.bos_token_id]
    n = 2 * length + len(before) + len(after)
    limit = loaded.info.max_positions
    if n > limit:
        raise HeadscopeError(PROBE_TOO_LONG.format(length=length, n=n, limit=limit, model=loaded.info.id,
                                                   most=(limit - len(before) - len(after)) // 2))
    vocab = min(len(tokenizer), loaded.model.get_input_embeddings().num_embeddings)
    candidates = np.setdiff1d(np.arange(vocab), tokenizer.all_special_ids)  # [vocab - special]
    half = np.random.default_rng(seed).choice(candidates, size=length, replace=candidates.size < length)  # [length]
    return np.concatenate([before, half, half, after]).astype(np.int64)  # [pos]


def analyze_induction_probe(loaded: LoadedModel, length: int = PROBE_LENGTH, seed: int = 0,
                            layers: Iterable[int] | None = None, exclude_first_token: bool = True,
                            exclude_current_token: bool = False, keep_patterns: bool | None = None, *,
                            query_position: int | None = None, exclude_special_keys: bool = False,
                            exclude_bos: bool = True) -> AnalysisResult:
    """`analyze_ids` on `induction_probe_ids(loaded, length, seed)`; the result records length and seed."""
    ids = induction_probe_ids(loaded, length, seed)
    return analyze_ids(loaded, ids, layers, exclude_first_token, exclude_current_token,
                       induction_probe={"length": length, "seed": seed}, keep_patterns=keep_patterns,
                       query_position=query_position, exclude_special_keys=exclude_special_keys,
                       exclude_bos=exclude_bos)
