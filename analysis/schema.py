"""Reading JSON that a user hands back (a report's embedded results): strict parsing, then the JSON Schema.

`parse_json` accepts only what RFC 8259 calls JSON: no NaN or Infinity, no number that overflows a float
(`1e999999`), no integer longer than MAX_INT_DIGITS, no nesting past the recursion limit. `validate_results` checks a
document against `schemas/headscope.results-1.schema.json` and the sizes that must agree with each other (one
token id per token, one Q mean per head, ...). Anything else is one HeadscopeError line; never a traceback.
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
_HERE = Path(__file__).resolve()
SCHEMA_FILE = next((d / SCHEMA_NAME for d in (_HERE.parents[1] / "schemas", _HERE.parent / "schemas")
                    if (d / SCHEMA_NAME).is_file()), _HERE.parents[1] / "schemas" / SCHEMA_NAME)
MAX_INT_DIGITS = 20
MAX_QUOTED = 120  # characters of a bad value quoted in a message
MAX_ERRORS = 100  # schema errors looked at to pick the one to report

BAD_JSON = "{what} is not valid JSON ({why})."
NOT_RESULTS = "{what} is not a headscope.results/1 document: {where} {why}."
INCONSISTENT = "{what} is not a consistent headscope.results/1 document: {why}."


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
def _validator():
    """The schema's validator, with a fast path for the long arrays of numbers (jsonschema takes ~30 us a number).

    An "items" whose item schema is a reference to one of the schema's number definitions is checked in one pass
    (types, then numpy's min and max against that definition's bounds); only an array that fails goes through
    jsonschema's own "items", which then names the first bad element.
    """
    import numpy as np
    from jsonschema import Draft202012Validator, validators

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    bounds = {f"#/$defs/{name}": (spec["minimum"], spec["maximum"]) for name, spec in schema["$defs"].items()
              if spec.get("type") == "number"}
    items = Draft202012Validator.VALIDATORS["items"]

    def fast_items(validator, item_schema, instance, parent):
        low_high = bounds.get(item_schema.get("$ref")) if isinstance(item_schema, dict) else None
        if low_high is not None and isinstance(instance, list) and all(type(x) in (int, float) for x in instance):
            values = np.asarray(instance, dtype=np.float64)  # [n]
            if not values.size or (low_high[0] <= values.min() and values.max() <= low_high[1]):
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
        return f"must be of type {error.validator_value}, not {type(error.instance).__name__}"
    if kind in ("minimum", "maximum"):
        return f"is {_short(repr(error.instance))}, out of the allowed range ({kind} {error.validator_value})"
    if kind == "const":
        return f"must be {error.validator_value!r}, not {_short(repr(error.instance))}"
    return _short(" ".join(error.message.split()))


def validate_results(data, what: str = "The document") -> dict:
    """`data` if it is a headscope.results/1 document whose sizes agree, else a one-line HeadscopeError."""
    from jsonschema.exceptions import best_match

    try:
        error = best_match(itertools.islice(_validator().iter_errors(data), MAX_ERRORS))  # bounded work
    except RecursionError:
        raise HeadscopeError(NOT_RESULTS.format(what=what, where="the document", why="is nested too deeply")) from None
    if error is not None:
        raise HeadscopeError(NOT_RESULTS.format(what=what, where=_where(error), why=_why(error)))
    _check_sizes(data, what)
    return data


def _check_sizes(data: dict, what: str) -> None:
    model = data["model"]
    n_layers, n_heads, n_kv = model["n_layers"], model["n_heads"], model["n_kv_heads"]
    problems = []
    if n_heads % n_kv:
        problems.append(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
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
