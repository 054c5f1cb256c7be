"""The query token and the two exclusions on the command line, in the JSON, the report and its reproduce command
(issue 12)."""

import json
import re
import shlex

import numpy as np
import pytest

from analysis import analyze, load_model
from reports.html import render_report
from tests.conftest import FIJI
from tests.reports.test_cli import assert_one_line_error, run_cli


@pytest.mark.parametrize("position", ["99", "-99"])
def test_an_out_of_range_query_is_one_line_and_exit_2(gpt2_path, capsys, position):
    code, lines = run_cli(capsys, "--model", gpt2_path, "--query-position=" + position, "--json", "-")
    assert code == 2
    assert_one_line_error(code, lines, f"Query position {position} is out of range")


def test_a_query_that_is_not_a_number_is_one_line_and_exit_2(gpt2_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "--model", gpt2_path, "--query-position", "x")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--query-position: invalid int value: 'x'" in lines[0]


def test_the_json_and_the_reproduce_command_carry_the_query(gpt2_path, tmp_path, capsys):
    out = tmp_path / "out.json"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--layer", 1, "--query-position", -4, "--exclude-special-keys",
                          "--include-bos", "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    n = len(data["tokens"])
    settings = data["settings"]
    assert settings["query_position"] == n - 4 and settings["query_token"] == data["tokens"][n - 4]
    assert settings["query_choice"] == "chosen" and settings["exclude_special_keys"] is True
    assert settings["exclude_bos"] is False and settings["bos_excluded"] is False
    argv = shlex.split(data["provenance"]["command"])
    assert argv[argv.index("--query-position") + 1] == str(n - 4)  # absolute: the same token on a rerun
    assert "--exclude-special-keys" in argv and "--include-bos" in argv
    again = tmp_path / "again.json"
    assert run_cli(capsys, *argv[3:argv.index("--json")], "--json", again)[0] == 0
    assert json.loads(again.read_text())["layers"] == data["layers"]


def test_the_report_names_the_query_token_and_both_exclusions(bert_path):
    loaded = load_model(str(bert_path))
    result = analyze(loaded, FIJI, layers=[0], keep_patterns=True)
    page = render_report(result)
    p, token = result.query, result.query_token
    assert result.tokens[-1] == "[SEP]" and p == result.n_tokens - 2
    text = re.sub(r"\s+", " ", page)
    assert f"use query token {p} <code><bdi>{token}</bdi></code>" in text
    assert "the last non-special token (default for encoders)" in text
    assert "against every other position except the first" in text
    assert "exclude BOS from the head scores: yes (applied)" in text and "exclude special keys: no" in text
    assert f"query token {p} &#39;{token}&#39;" in text  # the charts' titles, in their specs
    assert "Query to other tokens" in page and "Final to previous" not in page


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_report_says_the_query_read_out_keeps_the_first_token(family, bert_path, tmp_path_factory):
    """The page said "The dot products and the query read-out use query token P against every other position except
    the first" ("earlier positions except the first" on a causal model), but the read-out (the softmax weights of the
    query's row) holds the weight on position 0 too: an encoder's [CLS], a Llama's BOS, where a sink's weight goes.
    The page now names each one's keys; the read-out's are those of the model's own attention row."""
    from tests.analysis.test_query import eager
    from tests.checkpoints import tiny_llama

    path = bert_path if family == "bert" else tiny_llama(tmp_path_factory.mktemp("tiny-llama-readout"))
    loaded = load_model(str(path))
    result = analyze(loaded, FIJI, layers=[1])
    assert result.special_positions[0] == 0  # [CLS] or BOS
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", render_report(result)))
    said = re.search(r"The dot products use query token .*? against (.*?); its softmax read-out \(the weights of the "
                     r"query's row\) against (.*?)\. ", text)
    where = "earlier positions" if loaded.info.causal else "every other position"
    assert said.groups() == (f"{where} except the first", where)
    weights = eager(loaded, FIJI)[1]  # [head, q_pos, k_pos]
    p = result.query
    keys = np.arange(p) if loaded.info.causal else np.delete(np.arange(result.n_tokens), p)  # position 0 among them
    np.testing.assert_allclose(result.layers[1].final_to_prev, weights[:, p, keys].reshape(-1), rtol=1e-5, atol=1e-6)
