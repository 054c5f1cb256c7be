"""Reading JSON that a user hands back (a report's embedded results): strict parsing, then the JSON Schema.

`parse_json` accepts only what RFC 8259 calls JSON: no NaN or Infinity, no number that overflows a float
(`1e999999`), no integer longer than MAX_INT_DIGITS, no nesting past the recursion limit. `validate_results` checks a
document against `schemas/headscope.results-1.schema.json` and the sizes that must agree with each other (one
token id per token, one Q mean per head, ...). `validate_beyond` does the same for a report's ablation / neuron /
comparison block (`schemas/headscope.beyond-1.schema.json`), its sizes checked against the report's results.
Anything else is one HeadscopeError line; never a traceback.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path

from analysis.errors import HeadscopeError

# schemas/ at the checkout's top level; an installed package carries it as analysis/schemas (pyproject.toml)
SCHEMA_NAME = "headscope.results-1.schema.json"
BEYOND_SCHEMA_NAME = "headscope.beyond-1.schema.json"
BEYOND_SECTIONS = ("ablation", "neuron", "compare")  # the keys of a report's beyond block, in the JSON's order
_HERE = Path(__file__).resolve()


def schema_file(name: str) -> Path:
    return next((d / name for d in (_HERE.parents[1] / "schemas", _HERE.parent / "schemas") if (d / name).is_file()),
                _HERE.parents[1] / "schemas" / name)


SCHEMA_FILE = schema_file(SCHEMA_NAME)
MAX_INT_DIGITS = 20
MAX_QUOTED = 120  # characters of a bad value quoted in a message
MAX_ERRORS = 100  # schema errors looked at to pick the one to report
FLOAT_TOLERANCE = 1e-6  # relative and absolute: a value the writer derived, recomputed from the JSON
QK_STATS = ("q_means", "q_stds", "k_means", "k_stds")  # analysis.compare.QK_STATS (that module imports torch)

BAD_JSON = "{what} is not valid JSON ({why})."
NOT_RESULTS = "{what} is not a headscope.results/1 document: {where} {why}."
INCONSISTENT = "{what} is not a consistent headscope.results/1 document: {why}."
NOT_BEYOND = "{what} does not match " + BEYOND_SCHEMA_NAME + ": {where} {why}."
UNKNOWN_SECTION = ("{what} holds a section this headscope cannot read back ({key}; it knows "
                   + ", ".join(BEYOND_SECTIONS) + "): read it with the headscope that wrote the report.")
INCONSISTENT_BEYOND = "{what} does not fit the report's results: {why}."


class _Invalid(ValueError):
    pass


def _constant(name: str):
    raise _Invalid(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"the number {_short(text)} is too large for a float")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Invalid(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _short(text: str) -> str:
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 1] + "…"


def parse_json(text: str, what: str = "The document"):
    """Strict JSON: a HeadscopeError naming what is wrong, for any input."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise HeadscopeError(BAD_JSON.format(what=what, why=f"{exc.msg} at line {exc.lineno} column {exc.colno}")) \
            from None
    except RecursionError:  # the C scanner stops nesting at the recursion limit
        raise HeadscopeError(BAD_JSON.format(what=what, why="it is nested too deeply")) from None
    except (_Invalid, ValueError) as exc:
        raise HeadscopeError(BAD_JSON.format(what=what, why=" ".join(str(exc).split()) or type(exc).__name__)) \
            from None


@functools.cache
def _validator(name: str = SCHEMA_NAME):
    """Schema `name`'s validator, with a fast path for the long arrays of numbers (jsonschema takes ~30 us a number).

    An "items" whose item schema is a reference to one of the schema's number definitions is checked in one pass
    (types, then numpy's min and max against that definition's bounds); only an array that fails goes through
    jsonschema's own "items", which then names the first bad element.
    """
    import numpy as np
    from jsonschema import Draft202012Validator, validators

    schema = json.loads(schema_file(name).read_text(encoding="utf-8"))
    bounds = {f"#/$defs/{key}": (spec["minimum"], spec["maximum"], spec["type"] != "number")
              for key, spec in schema["$defs"].items() if spec.get("type") in ("number", ["number", "null"])}
    items = Draft202012Validator.VALIDATORS["items"]

    def fast_items(validator, item_schema, instance, parent):
        low_high = bounds.get(item_schema.get("$ref")) if isinstance(item_schema, dict) else None
        if low_high is not None and isinstance(instance, list):
            low, high, nullable = low_high
            numbers = [x for x in instance if x is not None] if nullable else instance  # null: NaN or inf, written
            if all(type(x) in (int, float) for x in numbers):
                values = np.asarray(numbers, dtype=np.float64)  # [n]
                if not values.size or (low <= values.min() and values.max() <= high):
                    return
        yield from items(validator, item_schema, instance, parent)

    return validators.extend(Draft202012Validator, {"items": fast_items})(schema)


def _where(error) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    return f"at {path.lstrip('.')}" if path else "the document"


def _why(error) -> str:
    """jsonschema's message without the offending value's repr (which may be megabytes)."""
    kind = error.validator
    if kind == "required":
        missing = [name for name in error.validator_value if name not in (error.instance or {})]
        return f"lacks the field {missing[0]!r}" if missing else "lacks a required field"
    if kind == "type":
        types = error.validator_value
        types = " or ".join(types) if isinstance(types, list) else types
        return f"must be of type {types}, not {type(error.instance).__name__}"
    if kind in ("minimum", "maximum"):
        return f"is {_short(repr(error.instance))}, out of the allowed range ({kind} {error.validator_value})"
    if kind == "minProperties" and not error.instance:
        return "is empty"
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        extra = [name for name in error.instance if name not in known]
        return f"has a field this version does not know ({_short(repr(extra[0]))})" if extra else "has extra fields"
    if kind == "const":
        return f"must be {error.validator_value!r}, not {_short(repr(error.instance))}"
    if kind == "enum" and "propertyNames" in error.schema_path:  # a key of an object of known names (head_scores)
        return (f"has a name this version does not know ({_short(repr(error.instance))}; it knows "
                f"{', '.join(error.validator_value)})")
    return _short(" ".join(error.message.split()))


def _check_schema(data, what: str, name: str, message: str) -> None:
    """A one-line HeadscopeError (`message`) naming the first schema error of `data`, if any."""
    from jsonschema.exceptions import best_match

    try:
        error = best_match(itertools.islice(_validator(name).iter_errors(data), MAX_ERRORS))  # bounded work
    except RecursionError:
        raise HeadscopeError(message.format(what=what, where="the document", why="is nested too deeply")) from None
    if error is not None:
        raise HeadscopeError(message.format(what=what, where=_where(error), why=_why(error)))


def validate_results(data, what: str = "The document") -> dict:
    """`data` if it is a headscope.results/1 document whose sizes agree, else a one-line HeadscopeError."""
    _check_schema(data, what, SCHEMA_NAME, NOT_RESULTS)
    _check_sizes(data, what)
    return data


def validate_beyond(data, results: dict, what: str = "The document") -> dict:
    """`data` if it is a report's ablation / neuron / comparison block (schemas/headscope.beyond-1.schema.json) that
    fits `results`, the report's validated headscope.results/1 document (the model of its ablation atlas and neuron
    view, the tokens the neuron view reads), else a one-line HeadscopeError. A section this version does not know is
    refused, not dropped. The comparison's two results documents are checked as validate_results checks one."""
    if isinstance(data, dict):
        unknown = [key for key in data if key not in BEYOND_SECTIONS]
        if unknown:
            raise HeadscopeError(UNKNOWN_SECTION.format(what=what, key=_short(repr(unknown[0]))))
    _check_schema(data, what, BEYOND_SCHEMA_NAME, NOT_BEYOND)
    compare = data.get("compare")
    if compare is not None:
        for side in ("a", "b"):
            validate_results(compare[side], f"{what} at compare.{side}")
    problems = _beyond_problems(data, results)
    if problems:
        raise HeadscopeError(INCONSISTENT_BEYOND.format(what=what, why=_short(problems[0])))
    return data


def _grid_problem(name: str, grid: list, model: dict) -> list[str]:
    """A [layer][head] grid that is not the model's n_layers x n_heads."""
    n_layers, n_heads = model["n_layers"], model["n_heads"]
    if len(grid) != n_layers or any(len(row) != n_heads for row in grid):
        return [f"{name} is not {n_layers} layers x {n_heads} heads"]
    return []


def _ablation_problems(name: str, ablation: dict, results: dict) -> list[str]:
    """An atlas that is not the model's layers x heads, or not measured on the results' tokens."""
    problems = _grid_problem(f"{name}.delta", ablation["delta"], results["model"])
    n_tokens = len(results["tokens"])
    if len(ablation["tokens"]) != n_tokens:
        problems.append(f"{name} has {len(ablation['tokens'])} tokens for the results' {n_tokens}")
    if any(position >= len(ablation["tokens"]) for position in ablation["masked_positions"]):
        problems.append(f"a masked position of {name} lies past its last token")
    return problems


def _close(x, y) -> bool:
    """Two JSON numbers (or nulls) equal to float rounding: what a difference recomputed from the JSON gives."""
    if x is None or y is None:
        return x is y
    return math.isclose(x, y, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)


def _difference_problem(name: str, difference: list, a: list, b: list) -> list[str]:
    """`difference` (a [layer][head] grid, null where either side is) that is not b - a; the shapes already checked."""
    for layer, (row, row_a, row_b) in enumerate(zip(difference, a, b)):
        for head, (value, x, y) in enumerate(zip(row, row_a, row_b)):
            if not _close(value, None if x is None or y is None else y - x):
                return [f"{name} at L{layer}H{head} is {value}, not B - A"]
    return []


def _qk_rows(a: dict, b: dict) -> list[dict]:
    """The Q/K statistics side by side of two headscope.results/1 documents, as CompareResult.qk_rows makes them
    from the results themselves (one row per layer x query head of either; a key head's value for each query head
    that reads it; null where that model has no such layer or head)."""
    def value(result: dict, layer: str, head: int, name: str):
        data = result["layers"].get(layer)
        if data is None or head >= len(data["q_means"]) or not data[name]:
            return None
        return data[name][head // (len(data["q_means"]) // len(data[name]))]

    rows = []
    for layer in sorted({*a["layers"], *b["layers"]}, key=int):
        heads = max(len(side["layers"][layer]["q_means"]) for side in (a, b) if layer in side["layers"])
        for head in range(heads):
            row = {"layer": int(layer), "head": head, "label": f"L{layer}H{head}"}
            for name in QK_STATS:
                row[f"{name}_a"], row[f"{name}_b"] = value(a, layer, head, name), value(b, layer, head, name)
            rows.append(row)
    return rows


def _same_rows(rows: list[dict], expected: list[dict]) -> bool:
    """Q/K rows with the same fields, labels and values (to float rounding: the results' numbers are rounded)."""
    return len(rows) == len(expected) and all(
        row.keys() == want.keys() and all(_close(row[key], value) if key.endswith(("_a", "_b")) else row[key] == value
                                          for key, value in want.items())
        for row, want in zip(rows, expected))


def _same_results(compared: dict, results: dict) -> bool:
    """Whether a comparison's A is the report's own results: the same document, but for the layers (A's measured
    layers are ones both models have, the page's those of the run) and so their warnings; shared layers equal."""
    rest = [key for key in {*compared, *results} if key not in ("layers", "warnings")]
    shared = set(compared["layers"]) & set(results["layers"])
    return (all(compared.get(key) == results.get(key) for key in rest)
            and all(compared["layers"][key] == results["layers"][key] for key in shared))


def _compare_problems(compare: dict, results: dict, ablation: dict | None) -> list[str]:
    a, b = compare["a"], compare["b"]
    if not _same_results(a, results):
        return ["compare.a is not the report's own results (model A's run on the page's text)"]
    same_shape = all(a["model"][key] == b["model"][key] for key in ("n_layers", "n_heads"))
    names = [name for name in a["head_scores"] if name in b["head_scores"]] if same_shape else []
    if sorted(compare["score_difference"]) != sorted(names):
        held = ", ".join(sorted(compare["score_difference"])) or "none"
        return [f"compare.score_difference holds {held}, not the scores both models have ({', '.join(names)})"]
    problems = []
    for name, grid in compare["score_difference"].items():
        problems += (_grid_problem(f"compare.score_difference.{name}", grid, a["model"])
                     or _difference_problem(f"compare.score_difference.{name}", grid, a["head_scores"][name],
                                            b["head_scores"][name]))
    if not _same_rows(compare["qk_stats"], _qk_rows(a, b)):
        problems.append("compare.qk_stats is not the Q/K statistics of compare.a and compare.b")
    atlases = compare["ablation"]
    if atlases is not None:
        problems += _ablation_problems("compare.ablation.a", atlases["a"], a)
        problems += _ablation_problems("compare.ablation.b", atlases["b"], b)
        if ablation is not None and ablation != atlases["a"]:
            problems.append("compare.ablation.a is not the report's own ablation atlas")
        measured_alike = same_shape and atlases["a"]["measure"] == atlases["b"]["measure"]
        difference = atlases["difference"]
        if difference is None and measured_alike:
            problems.append("compare.ablation.difference is missing, though both atlases measure the same")
        elif difference is not None and not measured_alike:
            problems.append("compare.ablation.difference is given for atlases measured differently")
        elif difference is not None and not problems:
            problems += (_grid_problem("compare.ablation.difference", difference, a["model"])
                         or _difference_problem("compare.ablation.difference", difference, atlases["a"]["delta"],
                                                atlases["b"]["delta"]))
    elif ablation is not None:
        problems.append("the report's ablation atlas is not compare.ablation.a")
    return problems


def _beyond_problems(data: dict, results: dict) -> list[str]:
    """What a reader can check cheaply of a beyond block: sizes against the report's results (its tokens, layers and
    heads), values that the writer derives from others (the neuron view's products and dots, a comparison's
    differences, Q/K rows and model A), and a comparison's A, the page's own results."""
    model, tokens = results["model"], results["tokens"]
    problems = []
    if "ablation" in data:
        problems += _ablation_problems("ablation", data["ablation"], results)
    neuron = data.get("neuron")
    if neuron is not None:
        problems += _neuron_problems(neuron, model, tokens)
    compare = data.get("compare")
    if compare is not None and not problems:
        problems += _compare_problems(compare, results, data.get("ablation"))
    return problems


def _neuron_problems(neuron: dict, model: dict, tokens: list) -> list[str]:
    n_tokens = len(tokens)
    bounds = (("layer", model["n_layers"], "model's layers"), ("head", model["n_heads"], "model's heads"),
              ("kv_head", model["n_kv_heads"], "model's key heads"), ("query_pos", n_tokens, "text's tokens"),
              ("key_pos", n_tokens, "text's tokens"))
    problems = [f"the neuron view's {name} {neuron[name]} is past the {what} (0..{size - 1})"
                for name, size, what in bounds if neuron[name] >= size]
    for name, size in (("q", model["d_head"]), ("k", model["d_head"]), ("products", model["d_head"]),
                       ("dots", n_tokens), ("weights", n_tokens)):
        if len(neuron[name]) != size:
            problems.append(f"the neuron view has {len(neuron[name])} {name} values for {size}")
    if problems:
        return problems
    group = model["n_heads"] // model["n_kv_heads"]
    if neuron["kv_head"] != neuron["head"] // group:
        problems.append(f"the neuron view's head {neuron['head']} reads key head {neuron['head'] // group}, "
                        f"not {neuron['kv_head']}")
    for name, position in (("query_token", "query_pos"), ("key_token", "key_pos")):
        if neuron[name] != tokens[neuron[position]]:
            problems.append(f"the neuron view's {name} is not the text's token {neuron[position]}")
    if not all(_close(p, q * k) for p, q, k in zip(neuron["products"], neuron["q"], neuron["k"])):
        problems.append("the neuron view's products are not q_i * k_i")
    elif not _close(neuron["dot"], math.fsum(neuron["products"])) or not _close(neuron["dots"][neuron["key_pos"]],
                                                                                 neuron["dot"]):
        problems.append("the neuron view's dot is not the sum of its products and its key's entry of dots")
    return problems


def _check_sizes(data: dict, what: str) -> None:
    model = data["model"]
    n_layers, n_heads, n_kv = model["n_layers"], model["n_heads"], model["n_kv_heads"]
    problems = []
    if n_heads % n_kv:
        problems.append(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    windows = model.get("attention_windows")
    if windows is not None and len(windows) != n_layers:
        problems.append(f"attention_windows has {len(windows)} layers but the model has {n_layers}")
    if len(data["token_ids"]) != len(data["tokens"]):
        problems.append(f"{len(data['tokens'])} tokens but {len(data['token_ids'])} token ids")
    if any(position >= len(data["tokens"]) for position in data.get("special_positions", [])):
        problems.append("a special position lies past the last token")
    if data["settings"].get("query_position", 0) >= len(data["tokens"]):
        problems.append("the query position lies past the last token")
    for key, layer in data["layers"].items():
        if int(key) >= n_layers:
            problems.append(f"layer {key} but the model has {n_layers} layers")
        sinks = n_heads if len(data["tokens"]) > 1 else 0  # a one-token text has no query after the first
        for name, size in (("first_self", n_heads), ("sink_mass", sinks)):
            if len(layer[name]) != size:
                problems.append(f"layer {key} has {len(layer[name])} {name} values for {size} heads")
        for name, size in (("q_means", n_heads), ("q_stds", n_heads), ("k_means", n_kv), ("k_stds", n_kv)):
            if layer[name] and len(layer[name]) != size:
                problems.append(f"layer {key} has {len(layer[name])} {name} values for {size} heads")
    for name, grid in data["head_scores"].items():
        if len(grid) != n_layers or any(len(row) != n_heads for row in grid):
            problems.append(f"head_scores.{name} is not {n_layers} layers x {n_heads} heads")
    if problems:
        raise HeadscopeError(INCONSISTENT.format(what=what, why=_short(problems[0])))
