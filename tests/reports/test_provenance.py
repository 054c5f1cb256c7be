"""Reproducible provenance everywhere (issue 12, item 5): the reproduce command is valid for every run, and the
CLI's JSON and the app's JSON download carry the same provenance block as the report."""

from __future__ import annotations

import html
import json
import re
import shlex
from dataclasses import replace
from datetime import datetime

import pytest

from analysis import analyze, analyze_induction_probe
from reports import provenance
from reports.__main__ import build_parser, main

KEYS = {"headscope", "git_commit", "libraries", "generated_at", "command"}
TEXT = "The cat sat on the mat."


def parse(command: str):
    """The command as the CLI parses it (argparse exits with status 2 on anything it rejects)."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "reports"]
    return build_parser().parse_args(argv[3:])


def test_every_kind_of_run_reproduces_as_a_valid_command(gpt2):
    plain = analyze(gpt2, TEXT, [1, 3])
    runs = {
        "plain": plain,
        "device_map": replace(plain, model={**plain.model, "device": "cuda:0", "device_map": "auto"}),
        "cuda_n": replace(plain, model={**plain.model, "device": "cuda:1"}),
        "dash_text": replace(plain, text="-v --json x  and more"),
        "first_token": replace(plain, exclude_first_token=False),
        "bfloat16": replace(plain, model={**plain.model, "dtype": "bfloat16"}),
        "probe": analyze_induction_probe(gpt2, 12, 3, layers=[2]),
    }
    for name, result in runs.items():
        args = parse(provenance.reproduce_command(result, head=5))
        assert args.model == result.model["id"] and args.head == 5 and args.layer == sorted(result.layers), name
        assert args.dtype == result.model["dtype"] and args.include_first_token == (not result.exclude_first_token)
        if result.induction_probe:
            assert (args.induction_probe, args.probe_seed) == (12, 3) and args.text is None
        else:
            assert args.text == result.text, name
        if result.model.get("device_map"):
            assert args.device_map == "auto", name
        else:
            assert args.device_map is None and args.device == result.model["device"].split(":")[0], name


def test_a_device_map_run_writes_a_command_that_reruns_it(gpt2_path, tmp_path, capsys):
    first = tmp_path / "first.json"
    assert main(["--model", str(gpt2_path), "--text", TEXT, "--device-map", "auto", "--layer", "2",
                 "--json", str(first)]) == 0
    data = json.loads(first.read_text())
    assert data["model"]["device_map"] == "auto"
    command = data["provenance"]["command"]
    assert "--device-map auto" in command and "--device " not in command
    argv = shlex.split(command)[3:]
    argv[argv.index("--json") + 1] = str(tmp_path / "again.json")
    assert main(argv) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again.pop("provenance")["command"] == command
    assert again == {key: value for key, value in data.items() if key != "provenance"}


def test_cli_json_carries_the_reports_provenance(gpt2_path, tmp_path, capsys):
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert main(["--model", str(gpt2_path), "--text", TEXT, "--layer", "1", "--head", "2", "--json", str(out_json),
                 "--html", str(out_html)]) == 0
    block = json.loads(out_json.read_text())["provenance"]
    assert set(block) == KEYS and block["headscope"]
    datetime.strptime(block["generated_at"], "%Y-%m-%d %H:%M:%S UTC")
    assert block["libraries"]["torch"] and block["libraries"]["transformers"]
    page = html.unescape(out_html.read_text())
    assert f"<dt>headscope</dt><dd>{block['headscope']}" in page
    if block["git_commit"]:
        assert f"git commit <code>{block['git_commit']}</code>" in page
    for name, version in block["libraries"].items():
        assert f"{name} {version}" in page
    report_command = re.search(r"<dt>Reproduce with</dt><dd><pre>(.*?)</pre>", page, re.DOTALL)[1]
    assert report_command.removesuffix(" --html report.html") == block["command"].removesuffix(" --json results.json")
    assert parse(block["command"]).head == 2




def test_a_checkout_with_uncommitted_edits_is_marked_dirty(monkeypatch):
    """Edits not committed change the numbers, so a report of such a checkout must not name the bare commit."""
    clean = provenance.git_commit.__wrapped__()
    if clean is None or not (provenance.PACKAGE_ROOT / ".git").exists():
        pytest.skip("not a git checkout (an installed wheel records its build's commit)")
    monkeypatch.setattr(provenance, "_modified", lambda: True)
    assert provenance.git_commit.__wrapped__() == clean.removesuffix("-dirty") + "-dirty"
    monkeypatch.setattr(provenance, "_modified", lambda: False)
    assert provenance.git_commit.__wrapped__() == clean.removesuffix("-dirty")
