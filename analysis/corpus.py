"""Many texts at once: stream them through the engine, keep only small per-head numbers, bootstrap the means.

Texts go through the engine `batch_size` at a time, padded forward passes (`capture_texts`: no T x T pattern
kept; on the CPU texts grouped by padded width, each padded to a width of its own so its numbers never depend on its
batch), and each is reduced to a few numbers per layer x head (CORPUS_MEASURES) and per layer (LAYER_MEASURES) right
after its pass. What grows with the corpus is only those numbers, (len(CORPUS_MEASURES) * layers * heads +
len(LAYER_MEASURES) * layers) float64 per text (about 11 KB for GPT-2 small), kept so the means can be
bootstrapped over texts.

Confidence intervals are percentile bootstrap intervals over texts: `n_boot` resamples of the texts with
replacement (a seeded [n_boot, n_texts] multinomial count matrix, so one matrix product gives every resample's
sums), the 2.5th and 97.5th percentiles of the resampled means. A value undefined for a text (NaN, e.g. a
one-token text) is left out of that text's contribution, so each mean is over the texts that define it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np
import torch

from analysis.capture import (
    EAGER_BUDGET,
    TEXTS_AT_ONCE,
    Capture,
    TextInput,
    resolve_query,
    run_pass,
    text_inputs,
    to_capture,
)
from analysis.corpus_io import LONG_NUMBER, check_not_a_table, json_problem
from analysis.errors import HeadscopeError
from analysis.head_scores import combine_score_parts
from analysis.loading import LoadedModel
from analysis.metrics import compute_qk_measures_t, device_kind, key_head_of, rank_biserial
from analysis.patterns import to_host
from analysis.pipeline import (
    BAD_BATCH_SIZE,
    BATCH_SIZE,
    OUT_OF_MEMORY,
    _is_out_of_memory,
    bos_present,
    measured_mannwhitney,
)
from analysis.results import HEAD_SCORE_NAMES, MODEL_KEYS, SCORE_DEFINITION, json_floats

SCHEMA = "headscope.corpus/1"
N_BOOT = 1000
SEED = 0
LEVEL = 0.95
BOOT_CHUNK = 2**20  # count-matrix entries drawn at once: memory stays bounded for any number of texts
QK_MEASURES = ("q_mean", "q_std", "k_mean", "k_std")
CORPUS_MEASURES = HEAD_SCORE_NAMES + QK_MEASURES  # each [layer, head] per text
LAYER_MEASURES = ("rank_biserial", "rank_biserial_centered")  # each [layer] per text
NO_TEXTS = "{source} holds no texts."
MEASURED_WITH = "These measurements were taken with exclude_first_token={got}, not {want}: capture them again."
NOT_OBJECT = "line {number} is not a JSON object."
BAD_JSON = "line {number} cannot be read as JSON ({why})."
NO_TEXT_FIELD = 'line {number} has no string "text" field.'
NOT_UTF8_LINE = "line {number} is not UTF-8 text (bad byte at offset {offset} of the line)."
TOO_DEEP = "line {number} is JSON nested too deeply to read."
BAD_UNICODE = "line {number} holds a lone surrogate (U+{code:04X}), which is not text: fix the JSON escape."
UNEXPECTED = "unexpected {kind}: {message}"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # as corpus_io.detect_kind
TXT_SUFFIXES = (".txt", ".text")
PAD_MULTIPLE = 8  # a text's padded width: the next multiple of this above its length, whatever batch it is in
MIN_WIDTH = 16  # and at least this: a pass of one text of 8 rows took another matrix-product path on the CPU
# Where a pass's texts are measured at once (capture.TEXTS_AT_ONCE: a GPU), a text's numbers depend on its batch at
# float rounding anyway: there passes are cut from the texts sorted by length, padded to the longest of each pass,
# and READ_AHEAD batches of texts are read per capture_texts call to fill them with similar lengths (at one batch a
# call, 256 texts of 67-88 tokens went through 22 passes, split by padded width, for 8 of 32).
PASSES_BY_LENGTH = dict(TEXTS_AT_ONCE)
READ_AHEAD = {"cpu": 1, "cuda": 8}

Progress = Callable[[int, int | None], None]  # (texts done, total or None when unknown)


def text_kind(name: str) -> str | None:
    """'jsonl' or 'txt' by a file name's extension (as corpus_io.detect_kind), None for a name without a known one."""
    suffix = PurePath(str(name)).suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "txt" if suffix in TXT_SUFFIXES else None


def parse_texts(data: str | bytes, source: str = "The file", kind: str | None = None) -> list[str | HeadscopeError]:
    """Texts of a corpus file (numbered_texts, less the line numbers)."""
    return [text for _, text in numbered_texts(data, source, kind)]


def numbered_texts(data: str | bytes, source: str = "The file",
                   kind: str | None = None) -> list[tuple[int, str | HeadscopeError]]:
    """(line number as the file numbers it, text or its error) of each text of a corpus file (a text is not its
    line: blank lines are counted, not texts, so the 500th text of a file with a blank line is on line 501).

    Texts of a corpus file: one per non-empty line (kind "txt"), or JSONL objects with a "text" field ("jsonl").

    The kind is `kind`, else the extension of `source` (the file's name: .txt is one text per line whatever its
    lines look like, .jsonl/.json/.ndjson JSON lines), else, for a name without either, JSONL when the first line
    starts with "{". Every problem is its own line's: a line that is not UTF-8 (when `data` is bytes), not a JSON
    object, nested too deeply, or without a string "text" becomes a HeadscopeError in its place, so it is reported,
    not dropped, and the other lines go on; errors name the line as the file numbers it. Only a file with no text at
    all is an error of the whole file, as is a .csv/.tsv name (corpus_io.NOT_A_TABLE: its lines are no texts).
    """
    if kind is None:
        check_not_a_table(source)
    bom = codecs.BOM_UTF8 if isinstance(data, bytes) else "\ufeff"
    data = data.removeprefix(bom)  # as corpus_io.parse_lines: Notepad's "UTF-8" BOM is no part of the first text
    lines = [(number, line) for number, line in enumerate(data.splitlines(), 1) if line.strip()]  # numbered as in
    # the file, so that an error names the line an editor shows
    if not lines:
        raise HeadscopeError(NO_TEXTS.format(source=source))
    kind = kind or text_kind(source)
    if kind is None:
        first = lines[0][1]
        jsonl = first.lstrip().startswith(b"{" if isinstance(first, bytes) else "{")
    else:
        jsonl = kind == "jsonl"
    texts: list[tuple[int, str | HeadscopeError]] = []
    for number, line in lines:
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                texts.append((number, HeadscopeError(NOT_UTF8_LINE.format(number=number, offset=exc.start))))
                continue
        texts.append((number, _jsonl_text(line, number) if jsonl else _checked_text(line, number)))
    return texts


def _checked_text(text: str, number: int) -> str | HeadscopeError:
    """The text, or its error when it cannot be written out as UTF-8 (a lone surrogate from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return HeadscopeError(BAD_UNICODE.format(number=number, code=ord(text[exc.start])))
    return text


def _jsonl_text(line: str, number: int) -> str | HeadscopeError:
    try:
        item = json.loads(line)
    except RecursionError:
        return HeadscopeError(TOO_DEEP.format(number=number))
    except json.JSONDecodeError as exc:  # what json says is wrong, and where on the line
        return HeadscopeError(BAD_JSON.format(number=number, why=json_problem(exc)))
    except ValueError:  # an integer past Python's digit limit
        return HeadscopeError(BAD_JSON.format(number=number, why=LONG_NUMBER))
    if not isinstance(item, dict):
        return HeadscopeError(NOT_OBJECT.format(number=number))
    if not isinstance(item.get("text"), str):
        return HeadscopeError(NO_TEXT_FIELD.format(number=number))
    return _checked_text(item["text"], number)


def excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass(frozen=True)
class TextRecord:
    """One input text: its position (1-based), an excerpt, and its token count or its error."""

    number: int
    excerpt: str
    n_tokens: int | None = None
    error: str | None = None


def compute_text_values(captured, model: dict, exclude_first_token: bool = True, exclude_current_token: bool = False,
                        exclude_bos: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One text's small numbers: ({CORPUS_MEASURES: [layer, head]}, {LAYER_MEASURES: [layer]}), NaN if undefined,
    from a measured Capture's `measures` (capture_texts: computed on the model's device) or else from its q and k,
    by the same functions on the host.

    `k_mean`/`k_std` are those of the key head each query head reads (equal to the key head's own with
    grouped-query attention). The rank-biserial effect sizes are the same-vs-different-head comparison of the
    default query token's dot products (analysis.head_scores), raw and with each key head's mean key removed.
    """
    n_layers, n_heads = len(captured.score_parts), int(model["n_heads"])
    causal = bool(model.get("causal", True))  # the default query token, as analyze_batch uses (capture resolved it)
    query = -1 if captured.query_position is None else captured.query_position
    scores = combine_score_parts(captured.score_parts, captured.score_fixed,
                                 exclude_bos and bos_present(captured.special), exclude_current_token)  # as summarize
    heads = {name: scores.get(name, np.full((n_layers, n_heads), np.nan)) for name in HEAD_SCORE_NAMES}
    qk = {name: np.full((n_layers, n_heads), np.nan) for name in QK_MEASURES}  # [layer, head] each
    layer_values = {name: np.full(n_layers, np.nan) for name in LAYER_MEASURES}  # [layer] each
    measures = captured.measures  # measured on the model's device in the pass (capture_texts)
    if measures is None:  # q and k kept on the host (`capture`): the same torch functions there
        measures = {layer: to_host(compute_qk_measures_t(torch.from_numpy(q), torch.from_numpy(k), exclude_first_token,
                                                         query, causal=causal))
                    for layer, (q, k) in enumerate(zip(captured.q, captured.k))}
    elif captured.exclude_first_token != exclude_first_token:
        raise ValueError(MEASURED_WITH.format(got=captured.exclude_first_token, want=exclude_first_token))
    for layer, found in measures.items():
        if found["q_means"].size:
            groups = key_head_of(found["q_means"].size, found["k_means"].size)  # [head] -> kv_head
            qk["q_mean"][layer], qk["q_std"][layer] = found["q_means"], found["q_stds"]
            qk["k_mean"][layer], qk["k_std"][layer] = found["k_means"][groups], found["k_stds"][groups]  # [head]
        for name, suffix in zip(LAYER_MEASURES, ("", "_centered")):
            if "dp_counts" in found:  # measured with the pass's other texts (analysis.batched): U and the sizes
                (u1, _), (n1, n2) = found["mannwhitney" + suffix], found["dp_counts"]
                r = rank_biserial(u1, n1, n2) if n1 and n2 else None
            else:
                _, r = measured_mannwhitney(found, "mannwhitney" + suffix, found["same_head_dp" + suffix],
                                            found["diff_head_dp" + suffix])
            layer_values[name][layer] = np.nan if r is None else r
    return {**heads, **qk}, layer_values


def padded_width(n_tokens: int, limit: int | None = None) -> int:
    """The width a text of `n_tokens` is padded to in every corpus pass: the next multiple of PAD_MULTIPLE strictly
    above it (at least MIN_WIDTH), so every row has padding (its attention mask is never dropped as all ones; a
    pass of [1, 8] positions rounded differently from [2, 8] on the tiny BERT), but at most `limit` (the
    model's positions; a text of exactly that many tokens has no padding, and where a batch mixes it with shorter
    ones its head scores can differ from its run alone at float rounding)."""
    width = max(MIN_WIDTH, (n_tokens // PAD_MULTIPLE + 1) * PAD_MULTIPLE)
    return width if limit is None else max(n_tokens, min(width, limit))


def read_ahead(device, batch_size: int) -> int:
    """Texts to hand capture_texts at once on `device` (READ_AHEAD)."""
    return batch_size * READ_AHEAD[device_kind(device)]


def corpus_passes(loaded: LoadedModel, items: list[tuple[int, TextInput]], batch_size: int):
    """(padded width, attention route, [(index, item)]) of each pass over `items`. PASSES_BY_LENGTH: `batch_size`
    texts of similar lengths a pass, padded to the longest one's padded width; else texts grouped by their own
    padded width, so each text's numbers never depend on its batch."""
    limit = loaded.info.max_positions
    if PASSES_BY_LENGTH[device_kind(loaded.info.device)]:
        items = sorted(items, key=lambda pair: (pair[1].ids.size, pair[0]))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = padded_width(chunk[-1][1].ids.size, limit)
            yield width, corpus_route(loaded, width, batch_size)[0], chunk
        return
    groups: dict[int, list[tuple[int, TextInput]]] = {}
    for index, item in items:
        groups.setdefault(padded_width(item.ids.size, limit), []).append((index, item))
    for width in sorted(groups):
        route, size = corpus_route(loaded, width, batch_size)
        for start in range(0, len(groups[width]), size):
            yield width, route, groups[width][start:start + size]


def corpus_route(loaded: LoadedModel, width: int, batch_size: int) -> tuple[str, int]:
    """(attention route, texts per pass) for texts of padded `width`: decided by the width alone, never by what
    else is in the batch (capture's "auto" looks at the whole batch). On the CPU the model's eager attention while
    one text's [head, T, T] weights fit capture.EAGER_BUDGET, with at most as many texts per pass as fit it
    together; sdpa beyond, and on a GPU."""
    if torch.device(loaded.info.device).type != "cpu":
        return "sdpa", batch_size
    one = loaded.info.n_heads * width * width * 4  # bytes of one text's float32 [head, T, T] eager weights
    if one > EAGER_BUDGET:
        return "sdpa", batch_size
    return "eager", max(1, min(batch_size, EAGER_BUDGET // one))


def _capture_pass(loaded: LoadedModel, items: list[TextInput], width: int, route: str,
                  reduce: Callable[[Capture], object], exclude_first_token: bool) -> list:
    """One padded pass (no T x T pattern, no read-outs: every layer's q/k measurements and head-score sums, on the
    model's device, one copy to the host), each text's Capture reduced at once (`reduce`). A batch that fails (out
    of memory, or any error of one text) is split in halves, so only the text at fault gets the error."""
    try:
        queries = [(resolve_query(item.special, loaded.info.causal)[0], None) for item in items]  # as `capture`
        texts = run_pass(loaded, items, pattern_layers=[], keep_patterns=False, measure=True, measure_all=True,
                         exclude_first_token=exclude_first_token, attention=route, queries=queries, width=width)
    except Exception as exc:  # noqa: BLE001 - one bad text must not lose the others
        if _is_out_of_memory(exc) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            if _is_out_of_memory(exc):
                return [HeadscopeError(OUT_OF_MEMORY.format(n=items[0].ids.size))]
            return [_as_error(exc)]
        half = len(items) // 2
        return [*_capture_pass(loaded, items[:half], width, route, reduce, exclude_first_token),
                *_capture_pass(loaded, items[half:], width, route, reduce, exclude_first_token)]
    of_pass = getattr(reduce, "of_pass", None)  # the corpus's values, for every text of a pass measured at once
    try:
        values = None if of_pass is None else of_pass(items, texts, exclude_first_token)
    except Exception:  # noqa: BLE001 - text by text below, so the error is only its text's
        values = None
    if values is not None:
        return values
    out = []
    for item, text in zip(items, texts):
        try:
            out.append(reduce(to_capture(loaded, item, text, exclude_first_token)))
        except Exception as exc:  # noqa: BLE001 - one bad text must not lose the others
            out.append(_as_error(exc))
    return out


def _as_error(exc: Exception) -> HeadscopeError:
    return exc if isinstance(exc, HeadscopeError) else HeadscopeError(UNEXPECTED.format(kind=type(exc).__name__,
                                                                                        message=exc))


def capture_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = BATCH_SIZE,
                  reduce: Callable[[Capture], object] | None = None, exclude_first_token: bool = True) -> list:
    """The corpus's passes: for each text, in order, `reduce(its Capture)` (default: the Capture itself: every
    layer's q/k measurements taken with `exclude_first_token` in `measures`, the head-score sums, no q, k or
    pattern), or the HeadscopeError of a text that cannot be analysed (empty, too long, ...; an exception of
    `reduce` too); the others are unaffected.

    On the CPU texts are grouped by padded width (`padded_width`) and run up to `batch_size` per padded pass
    (fewer where `corpus_route` says so), and each text's numbers depend on the text alone, not on its batch: every
    pass pads it to the same width, with the same attention route, each text is measured on its own (capture's
    text by text route), and the CPU's matrix products give each row the same bits whatever the other rows are
    (tests/analysis/test_corpus_store.py runs texts in different batches and compares). On a GPU a pass's texts
    are measured at once (capture.TEXTS_AT_ONCE, analysis.batched) and reduced at once (TextValues.of_pass): the
    same numbers to float rounding (tests/analysis/test_batched.py), which there may depend on the batch, as the
    GPU's batched forward pass already does; so there passes take `batch_size` texts of similar lengths, padded
    to the longest (`corpus_passes`).
    So on the CPU two engines that batch a corpus differently (local, Ray) write the same rows, rank statistics
    included: padding each text to the longest of its batch instead changed its sums' rounding with its batch, and
    the same-vs-different-head Mann-Whitney ranking flipped on dot products equal to rounding (by up to 0.6 in r on
    the tiny test models' shortest texts). Against a text's own unpadded pass (`capture`) the numbers agree to
    float rounding (~1e-6), rank statistics up to such flips.
    """
    if batch_size < 1:
        raise HeadscopeError(BAD_BATCH_SIZE.format(size=batch_size))
    reduce = reduce or (lambda captured: captured)
    out: list = [None] * len(texts)
    items = []
    for index, item in enumerate(text_inputs(loaded, list(texts))):
        if isinstance(item, HeadscopeError):
            out[index] = item
        else:
            items.append((index, item))
    for width, route, chunk in corpus_passes(loaded, items, batch_size):
        results = _capture_pass(loaded, [item for _, item in chunk], width, route, reduce, exclude_first_token)
        for (index, _), result in zip(chunk, results):
            out[index] = result
    return out


@dataclass(eq=False)
class TextValues:
    """capture_texts's `reduce` for the corpus: a Capture -> ({CORPUS_MEASURES}, {LAYER_MEASURES}, n_tokens), by
    compute_text_values; and `of_pass`, every text of a pass measured at once (capture.TEXTS_AT_ONCE) in one go."""

    model: dict
    exclude_first_token: bool = True
    exclude_current_token: bool = False
    exclude_bos: bool = True

    def __call__(self, captured: Capture) -> tuple[dict, dict, int]:
        heads, layers = compute_text_values(captured, self.model, self.exclude_first_token,
                                            self.exclude_current_token, self.exclude_bos)
        return heads, layers, len(captured.tokens)

    def of_pass(self, items: list[TextInput], texts, exclude_first_token: bool) -> list | None:
        """Every text's values from the pass's shared arrays (run_pass's texts, `together`), as __call__ gives
        them one Capture at a time; None where the pass was measured text by text, or with other exclusions."""
        together = texts[0].together
        if together is None or exclude_first_token != self.exclude_first_token:
            return None
        heads, layers = compute_pass_values(together, [item.special for item in items], self.model,
                                            self.exclude_current_token, self.exclude_bos)
        return [({name: values[b] for name, values in heads.items()}, {name: values[b] for name, values in
                 layers.items()}, item.ids.size) for b, item in enumerate(items)]


def text_values(model: dict, exclude_first_token: bool = True, exclude_current_token: bool = False,
                exclude_bos: bool = True) -> TextValues:
    return TextValues(model, exclude_first_token, exclude_current_token, exclude_bos)


def compute_pass_values(together: dict[str, np.ndarray], specials: list, model: dict,
                        exclude_current_token: bool = False, exclude_bos: bool = True) -> tuple[dict, dict]:
    """compute_text_values for every text of a pass measured at once: ({CORPUS_MEASURES: [text, layer, head]},
    {LAYER_MEASURES: [text, layer]}) from its arrays {name: [text, layer, ...]} (analysis.batched's names) and each
    text's special-token flags ([pos] bool each)."""
    bos = np.array([exclude_bos and bos_present(special) for special in specials])  # [text]: position 0 left out
    scores = [combine_score_parts(together["parts"], together["fixed"], flag, exclude_current_token)
              for flag in (False, True)]  # {name: [text, layer, head]} each
    heads = {name: np.where(bos[:, None, None], scores[1][name], scores[0][name]) for name in HEAD_SCORE_NAMES}
    groups = key_head_of(int(model["n_heads"]), together["k_means"].shape[-1])  # [head] -> kv_head
    heads.update(q_mean=together["q_means"], q_std=together["q_stds"], k_mean=together["k_means"][..., groups],
                 k_std=together["k_stds"][..., groups])  # [text, layer, head] each
    n1, n2 = together["dp_counts"][..., 0], together["dp_counts"][..., 1]  # [text, layer] each
    layers = {}
    for name, suffix in zip(LAYER_MEASURES, ("", "_centered")):
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty group: no effect size (NaN)
            r = rank_biserial(together["mannwhitney" + suffix][..., 0], n1, n2)  # [text, layer]
        layers[name] = np.where((n1 > 0) & (n2 > 0), r, np.nan)
    return heads, layers


def compute_result_values(result, exclude_first_token: bool = True) -> tuple[dict[str, np.ndarray],
                                                                          dict[str, np.ndarray]]:
    """As compute_text_values, from an AnalysisResult of every layer (analyze/analyze_batch with the same
    exclusions): the same numbers without q and k on the host."""
    n_layers, n_heads = int(result.model["n_layers"]), int(result.model["n_heads"])
    heads = {name: result.head_scores.get(name, np.full((n_layers, n_heads), np.nan)) for name in HEAD_SCORE_NAMES}
    qk = {name: np.full((n_layers, n_heads), np.nan) for name in QK_MEASURES}  # [layer, head] each
    layer_values = {name: np.full(n_layers, np.nan) for name in LAYER_MEASURES}  # [layer] each
    groups = key_head_of(n_heads, int(result.model["n_kv_heads"]))  # [head] -> kv_head
    for layer, measured in result.layers.items():
        if measured.q_means.size:
            qk["q_mean"][layer], qk["q_std"][layer] = measured.q_means, measured.q_stds
            qk["k_mean"][layer], qk["k_std"][layer] = measured.k_means[groups], measured.k_stds[groups]  # [head]
        stats = measured.dp_stats
        for name, r in zip(LAYER_MEASURES, (stats.rank_biserial, stats.rank_biserial_centered)):
            layer_values[name][layer] = np.nan if r is None else r
    return {**heads, **qk}, layer_values


def compute_bootstrap_ci(values: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED,
                         level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over texts and its percentile bootstrap interval: values [text, ...] -> (mean, low, high) [...].

    Each resample is a row of a multinomial count matrix [n_boot, n_texts] (how often each text is drawn), so
    the resampled sums are counts @ values; NaN entries count neither in the sum nor in the number of texts.
    The counts are drawn BOOT_CHUNK entries at a time from one seeded generator.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    shape = values.shape[1:]
    flat = values.reshape(n, int(np.prod(shape)))  # [text, cell]; -1 fails when no text was analysed
    finite = np.isfinite(flat)  # [text, cell]
    filled = np.where(finite, flat, 0.0)  # [text, cell]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / finite.sum(axis=0)  # [cell], NaN where no text defines it
    if n == 0:
        empty = np.full(shape, np.nan)
        return empty, empty.copy(), empty.copy()
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOT_CHUNK // n)  # resamples per draw
    boot = np.empty((n_boot, flat.shape[1]))  # [n_boot, cell]: independent of the number of texts
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)  # [boot, text]
        with np.errstate(invalid="ignore", divide="ignore"):
            # [boot, text] @ [text, cell] -> [boot, cell], twice: the sums and the numbers of defined texts
            boot[start:start + size] = (counts @ filled) / (counts @ finite)
    tail = (1 - level) / 2 * 100
    defined = np.isfinite(boot).any(axis=0)  # [cell]
    low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    gaps = np.isnan(boot).any(axis=0)  # [cell]: a resample without a text that defines it
    for cells, percentile in ((defined & ~gaps, np.percentile), (defined & gaps, np.nanpercentile)):
        if cells.any():  # nanpercentile goes column by column (a second per GPT-2 corpus): only where it must
            low[cells], high[cells] = percentile(boot[:, cells], [tail, 100 - tail], axis=0)
    return mean.reshape(shape), low.reshape(shape), high.reshape(shape)


@dataclass(frozen=True, eq=False)
class CorpusResult:
    """Means over texts with bootstrap intervals; numpy only, picklable (cacheable by Streamlit)."""

    model: dict  # MODEL_KEYS
    texts: tuple[TextRecord, ...]  # every input, in order, failed ones with their error
    values: dict[str, np.ndarray]  # CORPUS_MEASURES: [text, layer, head], one row per analysed text
    layer_values: dict[str, np.ndarray]  # LAYER_MEASURES: [text, layer]
    means: dict[str, np.ndarray]  # [layer, head] or [layer]: CORPUS_MEASURES and LAYER_MEASURES
    low: dict[str, np.ndarray]  # lower end of the bootstrap interval, same shapes
    high: dict[str, np.ndarray]  # upper end
    exclude_first_token: bool = True
    exclude_current_token: bool = False
    n_boot: int = N_BOOT
    seed: int = SEED
    level: float = LEVEL
    query_position: int | None = None  # as asked (negative: from the end); None: each text's default query token
    exclude_special_keys: bool = False
    exclude_bos: bool | None = True  # None: a results folder from before it, position 0 out of every text's scores
    score_definition: str = SCORE_DEFINITION  # the copies duplicate-token and induction count (SCORE_DEFINITIONS)

    @property
    def n_analysed(self) -> int:
        return sum(record.error is None for record in self.texts)

    @property
    def failures(self) -> list[TextRecord]:
        return [record for record in self.texts if record.error is not None]

    def to_dict(self) -> dict:
        """The means and intervals (not the per-text values) as JSON-ready lists, null where undefined."""
        stats = {name: {"mean": json_floats(self.means[name]), "low": json_floats(self.low[name]),
                        "high": json_floats(self.high[name])} for name in self.means}
        return {"schema": SCHEMA, "model": {key: self.model[key] for key in MODEL_KEYS},
                "settings": {"exclude_first_token": self.exclude_first_token,
                             "exclude_current_token": self.exclude_current_token, "n_boot": self.n_boot,
                             "seed": self.seed, "level": self.level, "query_position": self.query_position,
                             "exclude_special_keys": self.exclude_special_keys, "exclude_bos": self.exclude_bos,
                             "score_definition": self.score_definition},
                "n_texts": len(self.texts), "n_analysed": self.n_analysed,
                "texts": [{"number": r.number, "excerpt": r.excerpt, "n_tokens": r.n_tokens, "error": r.error}
                          for r in self.texts],
                "stats": stats}


@dataclass
class CorpusAccumulator:
    """Collects texts one at a time (only their small numbers), then bootstraps the means in `finish`.

    The numbers go into one table per kind that doubles when full: thousands of small per-text arrays
    interleaved with each forward pass's large temporaries fragmented the heap, and the process grew by
    ~0.3 MiB per text although each text keeps ~11 KB.
    """

    model: dict
    exclude_first_token: bool = True
    exclude_current_token: bool = False
    records: list[TextRecord] = field(default_factory=list)
    n_rows: int = 0
    heads: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # [capacity, measure * layer * head]
    layers: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # [capacity, measure * layer]
    query_position: int | None = None  # the query options the results of add_result were analysed with, recorded
    exclude_special_keys: bool = False
    exclude_bos: bool = True

    def add(self, captured) -> None:
        """A text's Capture (q and k on the host)."""
        heads, layers = compute_text_values(captured, self.model, self.exclude_first_token, self.exclude_current_token)
        self._add_row(heads, layers, captured.text, len(captured.tokens))

    def add_result(self, result) -> None:
        """A text's AnalysisResult of every layer, analysed with this accumulator's exclusions."""
        heads, layers = compute_result_values(result, self.exclude_first_token)
        self._add_row(heads, layers, result.text, result.n_tokens)

    def _add_row(self, heads: dict, layers: dict, text: str, n_tokens: int) -> None:
        row = np.concatenate([heads[name].ravel() for name in CORPUS_MEASURES])  # [measure * layer * head]
        layer_row = np.concatenate([layers[name] for name in LAYER_MEASURES])  # [measure * layer]
        if self.n_rows == len(self.heads):  # full: double the capacity
            capacity = max(16, 2 * self.n_rows)
            self.heads = np.resize(self.heads, (capacity, row.size))
            self.layers = np.resize(self.layers, (capacity, layer_row.size))
        self.heads[self.n_rows], self.layers[self.n_rows] = row, layer_row
        self.n_rows += 1
        self.records.append(TextRecord(len(self.records) + 1, excerpt(text), n_tokens))

    def add_failure(self, text: str, error: str) -> None:
        self.records.append(TextRecord(len(self.records) + 1, excerpt(text), error=error))

    def finish(self, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> CorpusResult:
        n_layers, n_heads = int(self.model["n_layers"]), int(self.model["n_heads"])
        heads = self.heads[:self.n_rows].reshape(self.n_rows, len(CORPUS_MEASURES), n_layers, n_heads)
        layers = self.layers[:self.n_rows].reshape(self.n_rows, len(LAYER_MEASURES), n_layers)
        values = {name: heads[:, i].copy() for i, name in enumerate(CORPUS_MEASURES)}  # [text, layer, head]
        layer_values = {name: layers[:, i].copy() for i, name in enumerate(LAYER_MEASURES)}  # [text, layer]
        means, low, high = {}, {}, {}
        for name, per_text in {**values, **layer_values}.items():
            means[name], low[name], high[name] = compute_bootstrap_ci(per_text, n_boot, seed, level)
        return CorpusResult(model={key: self.model[key] for key in MODEL_KEYS}, texts=tuple(self.records),
                            values=values, layer_values=layer_values, means=means, low=low, high=high,
                            exclude_first_token=self.exclude_first_token,
                            exclude_current_token=self.exclude_current_token, n_boot=n_boot, seed=seed, level=level,
                            query_position=self.query_position, exclude_special_keys=self.exclude_special_keys,
                            exclude_bos=self.exclude_bos)


def analyze_corpus(loaded: LoadedModel, texts: Iterable[str | Exception], exclude_first_token: bool = True,
                   exclude_current_token: bool = False, progress: Progress | None = None, n_boot: int = N_BOOT,
                   seed: int = SEED, total: int | None = None, batch_size: int = BATCH_SIZE) -> CorpusResult:
    """Stream `texts` through the model `batch_size` at a time and bootstrap the means of their per-head numbers.

    Each buffer of `batch_size` texts (READ_AHEAD batches on a GPU) goes through `capture_texts` (padded passes,
    no T x T pattern kept) and `compute_text_values`: the numbers analysis.corpus_store's rows hold, bit for bit,
    whatever the batch size, and equal to each text's own `analyze` to float rounding. The default batch size
    (pipeline.BATCH_SIZE, 16) is faster than one text per pass on the CPU too (README, corpus mode).

    An item that is an exception (e.g. a bad JSONL line from `parse_texts`) and a text that fails (empty, too
    long, ...) are recorded with their error and skipped. `progress(done, total)` is called after each text;
    `total` defaults to len(texts) when texts has a length.
    """
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    model = loaded.info.to_dict()
    acc = CorpusAccumulator(model, exclude_first_token, exclude_current_token)
    done = waiting = 0  # texts done; texts in the buffer (not its exceptions)
    buffer: list[str | Exception] = []

    def flush() -> None:
        nonlocal done, waiting
        if not buffer:
            return
        results = iter(capture_texts(loaded, [text for text in buffer if not isinstance(text, Exception)],
                                     batch_size, text_values(model, exclude_first_token, exclude_current_token),
                                     exclude_first_token))
        for text in buffer:
            if isinstance(text, Exception):
                acc.add_failure("", str(text))
            else:
                result = next(results)
                if isinstance(result, Exception):
                    acc.add_failure(text, str(result))
                else:
                    acc._add_row(result[0], result[1], text, result[2])
            done += 1
            if progress is not None:
                progress(done, total)
        buffer.clear()
        waiting = 0

    ahead = read_ahead(loaded.info.device, batch_size)
    for text in texts:
        buffer.append(text)
        waiting += not isinstance(text, Exception)
        if waiting >= ahead:
            flush()
    flush()
    return acc.finish(n_boot, seed)
