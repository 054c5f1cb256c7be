"""Hostile input on the command line: tampered reports, damaged checkpoints, odd characters, bad batch lines.

Every case is one line on stderr starting "headscope: error: " and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from markupsafe import escape

from reports.__main__ import main
from reports.html import read_report_results
from tests.analysis.test_hostile_loading import DAMAGES

NOT_JSON = "cannot be read as JSON (Expecting value at column 1)"  # json's own words for a line that is not JSON

RESULTS = re.compile(r'(<script type="application/json" id="headscope-results">)(.*?)(</script>)', re.DOTALL)
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def assert_one_line_error(code, lines, pattern):
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("headscope: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def report(gpt2_path, tmp_path_factory):
    """A real report and the --json written for the same analysis."""
    out = tmp_path_factory.mktemp("report")
    assert main(["--model", str(gpt2_path), "--text", "The cat sat on the mat.", "--html", str(out / "r.html"),
                 "--json", str(out / "r.json")]) == 0
    return out / "r.html", json.loads((out / "r.json").read_text())


def tampered(report_path, tmp_path, payload: str):
    page = report_path.read_text(encoding="utf-8")
    out = tmp_path / "tampered.html"
    out.write_text(RESULTS.sub(lambda m: m.group(1) + payload + m.group(3), page, count=1), encoding="utf-8")
    return out


def test_an_untouched_report_reads_back_equal_to_its_json(report, tmp_path, capsys):
    path, written = report
    code, lines = run_cli(capsys, "--from-report", path, "--json", tmp_path / "back.json")
    assert code == 0, lines
    back = json.loads((tmp_path / "back.json").read_text())
    assert back == {key: value for key, value in written.items() if key != "provenance" or key in back}



def test_a_one_token_report_reads_back_equal_to_its_json(gpt2_path, tmp_path, capsys):
    """One token has no query after the first, so no sink mass: the reader accepts what the writer wrote."""
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", "cat", "--html", tmp_path / "one.html",
                          "--json", tmp_path / "one.json")
    assert code == 0, lines
    written = json.loads((tmp_path / "one.json").read_text())
    assert len(written["tokens"]) == 1 and all(not layer["sink_mass"] for layer in written["layers"].values())
    code, lines = run_cli(capsys, "--from-report", tmp_path / "one.html", "--json", tmp_path / "back.json")
    assert code == 0, lines
    back = json.loads((tmp_path / "back.json").read_text())
    assert back == {key: value for key, value in written.items() if key != "provenance"}

def _edit(results: dict, change) -> str:
    data = json.loads(json.dumps(results))
    change(data)
    return json.dumps(data)


TAMPERED = {
    "invalid JSON": (lambda good: '{"schema": "headscope.results/1", oops}',
                     r"The results JSON in .*tampered\.html is not valid JSON \(Expecting property name .* line 1 "),
    "NaN": (lambda good: json.dumps(good).replace('"parity_max_abs_err": 0.0', '"parity_max_abs_err": NaN', 1),
            r"is not valid JSON \(NaN is not a JSON number\)\.$"),
    "Infinity": (lambda good: '{"a": -Infinity}', r"is not valid JSON \(-Infinity is not a JSON number\)\.$"),
    "1e999999": (lambda good: '{"a": 1e999999}', r"is not valid JSON \(the number 1e999999 is too large for a float\)"),
    "5000-digit integer": (lambda good: '{"a": ' + "7" * 5000 + "}",
                           r"is not valid JSON \(an integer of 5000 digits\)\.$"),
    "nested 100k deep": (lambda good: "[" * 100_000 + "]" * 100_000,
                         r"is not valid JSON \(it is nested too deeply\)\.$"),
    "a list": (lambda good: "[1, 2, 3]", (r"is not a headscope\.results/1 document: the document must be of type "
                                         r"object, not list\.$")),
    "wrong schema": (lambda good: _edit(good, lambda d: d.update(schema="headscope.results/2")),
                     r"at schema must be 'headscope\.results/1', not 'headscope\.results/2'\.$"),
    "missing field": (lambda good: _edit(good, lambda d: d.pop("layers")),
                      r"is not a headscope\.results/1 document: the document lacks the field 'layers'\.$"),
    "missing layer field": (lambda good: _edit(good, lambda d: d["layers"]["6"].pop("q_means")),
                            r"at layers\.6 lacks the field 'q_means'\.$"),
    "huge integer": (lambda good: _edit(good, lambda d: d["model"].update(n_layers=10**15)),
                     r"at model\.n_layers is 1000000000000000, out of the allowed range \(maximum 1000000\)\.$"),
    "huge float": (lambda good: _edit(good, lambda d: d["layers"]["6"].update(parity_max_abs_err=1e300)),
                   r"at layers\.6\.parity_max_abs_err is 1e\+300, out of the allowed range"),
    "wrong type": (lambda good: _edit(good, lambda d: d.update(tokens="abc")),
                   r"at tokens must be of type array, not str\.$"),
    "a probability above 1": (lambda good: _edit(good, lambda d: d["layers"]["6"]["sink_mass"].__setitem__(0, 7.0)),
                              r"at layers\.6\.sink_mass\[0\] is 7\.0, out of the allowed range"),
    "sizes disagree": (lambda good: _edit(good, lambda d: d["token_ids"].pop()),
                       r"is not a consistent headscope\.results/1 document: 7 tokens but 6 token ids\.$"),
    "a layer past the model": (lambda good: _edit(good, lambda d: d["layers"].update({"99": d["layers"]["6"]})),
                               r"not a consistent .*: layer 99 but the model has 8 layers\.$"),
    "heads disagree": (lambda good: _edit(good, lambda d: d["layers"]["6"]["first_self"].pop()),
                       r"layer 6 has 11 first_self values for 12 heads\.$"),
    "a huge list": (lambda good: _edit(good, lambda d: d.update(tokens=list(range(100_000)))),
                    r"at tokens\[\d+\] must be of type string, not int\.$"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_report_is_one_line_and_exit_2(report, tmp_path, capsys, case):
    path, good = report
    payload, pattern = TAMPERED[case]
    code, lines = run_cli(capsys, "--from-report", tampered(path, tmp_path, payload(good)), "--json",
                          tmp_path / "out.json")
    assert_one_line_error(code, lines, pattern)
    assert len(lines[0]) < 400
    assert not (tmp_path / "out.json").exists()  # nothing is written from a tampered report


def test_a_report_that_is_not_utf8_or_not_a_report(tmp_path, capsys):
    (tmp_path / "bytes.html").write_bytes(b"<html>\xff\xfe</html>")
    code, lines = run_cli(capsys, "--from-report", tmp_path / "bytes.html", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, r"bytes\.html is not UTF-8 text \(bad byte at offset 6\)")
    (tmp_path / "plain.html").write_text("<html>hello</html>")
    code, lines = run_cli(capsys, "--from-report", tmp_path / "plain.html", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, r"holds no headscope results")
    code, lines = run_cli(capsys, "--from-report", tmp_path, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, r"Cannot read .*: Is a directory\.$")


def test_a_report_read_back_is_read_within_a_bound(tmp_path, capsys, monkeypatch):
    """A device that never ends (/dev/zero) once was read whole, until the process was killed."""
    import reports.html

    monkeypatch.setattr(reports.html, "MAX_REPORT_BYTES", 2**20)  # the real bound is 2 GiB
    code, lines = run_cli(capsys, "--from-report", "/dev/zero", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, r"/dev/zero is larger than 0\.000976562 GiB: is it a headscope report\?")


@pytest.mark.parametrize("seed, why", [("-1", "-1 is outside 0..4294967295"), ("4294967296", "is outside"),
                                       ("x", "'x' is not a whole number"), ("²", "'²' is not a whole number")])
def test_a_bad_probe_seed_is_one_line(gpt2_path, tmp_path, capsys, seed, why):
    with pytest.raises(SystemExit) as caught:
        main(["--model", str(gpt2_path), "--induction-probe", "8", "--probe-seed", seed, "--json", str(tmp_path / "o")])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument --probe-seed" in lines[0] and why in lines[0], lines


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_and_exit_2(gpt2_path, tmp_path, capsys, name):
    damage, pattern = DAMAGES[name]
    path = tmp_path / "damaged"
    shutil.copytree(gpt2_path, path)
    damage(path)
    code, lines = run_cli(capsys, "--model", path, "--text", "hello there", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, pattern)
    assert "trust_remote_code" not in lines[0]


def test_control_characters_are_visible_and_the_reproduce_command_runs(gpt2_path, tmp_path, capsys, monkeypatch):
    text = "NUL\x00 here\x01, a right-to-left \u202eoverride\u202c and\r\n\x1b[31mescape\x7f."
    out = tmp_path / "x.html"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", text, "--html", out, "--json", tmp_path / "x.json")
    assert code == 0, lines
    page = out.read_text(encoding="utf-8")
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", page.replace("\r\n", "\n"))  # no raw control character
    assert not any(char in page for char in BIDI_CONTROLS)  # none of them raw (the JSON holds them as \\u escapes)
    assert "NUL␀ here␁, a right-to-left ⟨U+202E⟩override⟨U+202C⟩ and␍\n␛[31mescape␡." in page
    assert '<pre id="analysed-text"><bdi>NUL␀' in page
    # the command reads the text from a file beside the report, and running it recomputes the same analysis
    assert (tmp_path / "x.text.txt").read_bytes() == text.encode("utf-8")
    command = re.search(r"<dt>Reproduce with</dt><dd><pre>(.*?)</pre>", page).group(1)
    argv = shlex.split(command.replace("&#39;", "'").replace("&amp;", "&"))
    assert argv[:3] == ["python", "-m", "reports"] and "--text-file" in argv and "x.text.txt" in argv
    monkeypatch.chdir(tmp_path)
    assert main(argv[3:] + ["--json", "again.json"]) == 0
    again, first = json.loads((tmp_path / "again.json").read_text()), json.loads((tmp_path / "x.json").read_text())
    assert again["text"] == text and again["tokens"] == first["tokens"] and again["layers"] == first["layers"]
    assert "--text-file x.text.txt" in first["provenance"]["command"]  # the JSON's command reads the same file


def test_an_odd_report_name_is_drawn_visibly_where_the_page_names_its_text_file(gpt2_path, tmp_path, capsys):
    """A right-to-left override and a byte that is not UTF-8 (a surrogate in Python's name of the file) in --html:
    the page names the text file beside it visibly and isolated (the surrogate once made writing the page fail,
    leaving an empty file)."""
    out = tmp_path / "r\u202ex\udcff.html"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", "ctl\x01here", "--html", out)
    assert code == 0, lines
    page = out.read_text(encoding="utf-8")
    assert "<code><bdi>r⟨U+202E⟩x⟨U+DCFF⟩.text.txt</bdi></code>" in page and "\u202e" not in page
    assert (tmp_path / "r\u202ex\udcff.text.txt").read_text(encoding="utf-8") == "ctl\x01here"


def test_a_quotable_text_stays_on_the_command_line(gpt2_path, tmp_path, capsys):
    code, _ = run_cli(capsys, "--model", gpt2_path, "--text", "Plain 'quoted' text; $HOME", "--html",
                      tmp_path / "p.html")
    assert code == 0
    assert "--text &#39;Plain" in (tmp_path / "p.html").read_text() and not (tmp_path / "p.text.txt").exists()


def test_batch_lines_fail_alone_and_odd_characters_stay_in_their_cell(gpt2_path, tmp_path, capsys):
    lines = [b'{"text": "A first good text."}',
             b'{"text": "' + "\u202eevil right-to-left text".encode() + b'"}',
             b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,  # nested 50k deep: RecursionError in json
             b'{"text": "bad byte \xff here"}',
             b'{"text": "\\ud800 lone surrogate"}',
             b'{"text": ' + b"9" * 5000 + b"}",
             b"[1, 2]",
             b'{"text": "The last good text."}']
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(b"\n".join(lines))
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", batch, "--out-dir", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("report-*.html")) == [
        "report-0001.html", "report-0002.html", "report-0008.html"]
    assert (tmp_path / "out" / "report-0002.text.txt").read_text(encoding="utf-8") == "\u202eevil right-to-left text"
    index = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "\u202e" not in index and "<bdi>⟨U+202E⟩evil right-to-left text</bdi>" in index
    for message in ("line 3 is JSON nested too deeply to read.", ("line 4 is not UTF-8 text (bad byte at offset 19 "
                    "of the line)."), "line 5 holds a lone surrogate (U+D800), which is not text: fix the JSON escape.",
                    "line 6 cannot be read as JSON (a number of more digits than Python reads).",
                    "line 7 is not a JSON object."):
        assert message in index
    assert err[-1].startswith("headscope: 3 reports, 5 failed")


def test_the_index_and_each_report_name_the_file_line_of_their_text(gpt2_path, tmp_path, capsys):
    """--out-dir numbers its reports by text (a blank line is none), while a failed text's error and --results rows
    number the file's lines: with blank lines, report-0002.html was of line 4, and the index's "#" of a bad line was
    not the "line N" its error named. The index gives each entry's line of the file, analysed or failed, as does
    corpus.html's table of failed texts, and each report's provenance its text's number and line: the text there,
    the --results row of that number."""
    from analysis.corpus_store import ResultsFolder

    lines = ["", json.dumps({"text": "The first text."}), "", json.dumps({"text": "The second text."}), "not json",
             "   ", json.dumps({"text": "The third text."})]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", batch, "--out-dir", tmp_path / "o")
    assert code == 0, err
    in_file = batch.read_text().splitlines()  # the file's lines, line N at N - 1
    texts = [number for number, line in enumerate(in_file, 1) if line.strip()]  # the file's line of each text
    index = (tmp_path / "o" / "index.html").read_text(encoding="utf-8")
    rows = re.findall(r'<tr id="text-(\d+)"><td>(\d+)</td><td>(\d+)</td>(.*?)</tr>', index, re.DOTALL)
    assert [(int(anchor), int(number), int(line)) for anchor, number, line, _ in rows] == [
        (number, number, line) for number, line in enumerate(texts, 1)]
    failed = [(int(line), row) for _, _, line, row in rows if "failed:" in row]
    assert [line for line, _ in failed] == [in_file.index("not json") + 1]
    # among a thousand rows, the failed ones listed at the top, each a link to its row
    bad = texts.index(failed[0][0]) + 1  # its text number
    assert f'<p>Failed: <a href="#text-{bad}">#{bad} (line {failed[0][0]})</a>.</p>' in index
    assert all(f"failed: line {line} {NOT_JSON}." in row for line, row in failed)  # one number for both
    assert any(f"(line {failed[0][0]}) failed: line {failed[0][0]} " in line for line in err), err
    corpus = (tmp_path / "o" / "corpus.html").read_text(encoding="utf-8")  # its failed texts: both numbers too
    table = corpus.split('id="corpus-failures"')[1]
    assert "<th>#</th><th>Line</th>" in table
    assert [(int(number), int(line)) for number, line in re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td>", table)] == [
        (number, line) for number, line in enumerate(texts, 1) if line == failed[0][0]]
    results = tmp_path / "r"
    assert run_cli(capsys, "--model", gpt2_path, "--batch", batch, "--results", results)[0] == 0
    rows_by_number = dict(zip(*ResultsFolder(results).read_rows(["number", "excerpt"]).to_pydict().values()))
    reports = sorted((tmp_path / "o").glob("report-*.html"))
    assert len(reports) == 3
    for report in reports:
        page = report.read_text(encoding="utf-8")
        (number, line), = re.findall(r"<dt>Input</dt><dd>text (\d+) of <code><bdi>[^<]*b\.jsonl</bdi></code>, "
                                     r"line (\d+)</dd>", page)
        text = read_report_results(report)["text"]
        assert report.name == f"report-{int(number):04d}.html"
        assert json.loads(in_file[int(line) - 1])["text"] == text == rows_by_number[int(line)]


def test_a_batch_where_every_line_fails_still_writes_its_index(gpt2_path, tmp_path, capsys):
    """...and exits 2, so that a script archiving reports sees that nothing was analysed."""
    (tmp_path / "bad.jsonl").write_bytes(b'{"x": 1}\n\xff\xfe\n')
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "bad.jsonl", "--out-dir", tmp_path / "o")
    assert code == 2, err
    assert err[-1].startswith("headscope: 0 reports, 2 failed")
    assert str(escape('line 1 has no string "text" field.')) in (tmp_path / "o" / "index.html").read_text()
    assert "Failed texts" in (tmp_path / "o" / "corpus.html").read_text()
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "bad.jsonl", "--results", tmp_path / "r")
    assert code == 2 and "(2 failed)" in err[-1], err  # the same with Parquet results
    (tmp_path / "empty.txt").write_text("\n")
    for out in ("--out-dir", "--results"):  # no texts at all: the same one line either way
        code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "empty.txt", out, tmp_path / "e")
        assert code == 2 and len(err) == 1 and "holds no texts" in err[0], (out, err)


def test_a_text_argument_that_is_not_utf8_is_one_line(gpt2_path, tmp_path, capsys):
    undecodable = b"ab\xffcd".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", undecodable, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, r"--text is not UTF-8 text \(bad byte at character 2\): save the text as "
                                       r"UTF-8 and use --text-file\.$")


def test_chart_labels_show_control_characters(gpt2):
    from analysis import analyze
    from reports.charts import build_layer_charts

    result = analyze(gpt2, "a\x00b \u202ec d", [6], keep_patterns=True)
    specs = json.dumps([item.chart.to_dict() for item in build_layer_charts(result, 6, 0)], ensure_ascii=False)
    assert "1: ␀" in specs  # the NUL token's label (the byte-level tokenizer splits the override into bytes)
    assert "\\u0000" not in specs and "\u202e" not in specs


def test_a_rerun_into_the_same_out_dir_leaves_no_report_of_the_earlier_run(gpt2_path, tmp_path, capsys):
    """A second, smaller batch into the folder of a first: the first run's report-0002..0004 (and the text file
    of its fourth) stayed beside the new index, a text that failed this time kept the old text's report under its
    number, and a folder of report-*.html held other texts than the index listed."""
    out = tmp_path / "out"
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(json.dumps({"text": t}) for t in ("One cat.", "Two cats.", "Three.", "ctl\x01four")))
    assert main(["--model", str(gpt2_path), "--batch", str(first), "--out-dir", str(out)]) == 0
    assert (out / "report-0004.text.txt").exists()
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"text": "Another cat."}) + '\n{"no text": 1}\n')
    capsys.readouterr()
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", second, "--out-dir", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["corpus.html", "index.html", "report-0001.html"]
    assert "3 reports of an earlier batch" in err[-2] and err[-1].startswith("headscope: 1 reports, 1 failed")
    (out / "mine.html").write_text("a file of the user's")  # only headscope's own report names are removed
    assert main(["--model", str(gpt2_path), "--batch", str(second), "--out-dir", str(out)]) == 0
    assert (out / "mine.html").exists()


def test_a_batch_stopped_midway_leaves_no_index_of_the_earlier_run(gpt2_path, tmp_path, capsys, monkeypatch):
    """Stopped (Ctrl-C, killed) after its first report, a rerun left the earlier run's index.html and corpus.html,
    which listed the earlier texts beside reports that now held other ones."""
    import reports.__main__ as cli

    out = tmp_path / "out"
    (tmp_path / "a.txt").write_text("First text here.\nSecond text here.\n")
    assert main(["--model", str(gpt2_path), "--batch", str(tmp_path / "a.txt"), "--out-dir", str(out)]) == 0
    written = cli._write_batch_entry

    def stop_at_the_second(number, *rest):
        if number == 2:
            raise KeyboardInterrupt
        return written(number, *rest)

    monkeypatch.setattr(cli, "_write_batch_entry", stop_at_the_second)
    (tmp_path / "b.txt").write_text("Other first.\nOther second.\n")
    assert main(["--model", str(gpt2_path), "--batch", str(tmp_path / "b.txt"), "--out-dir", str(out)]) == 130
    assert not (out / "index.html").exists() and not (out / "corpus.html").exists()


def test_the_index_counts_the_texts_analysed_not_every_line(gpt2_path, tmp_path, capsys):
    """index.html said "2 texts analysed" of a batch whose second line failed; it says how many of how many, as the
    run's line and corpus.html do."""
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "A good text."}) + '\n{"no text": 1}\n')
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "b.jsonl", "--out-dir", tmp_path / "o")
    assert code == 0 and err[-1].startswith("headscope: 1 reports, 1 failed"), err
    index = (tmp_path / "o" / "index.html").read_text(encoding="utf-8")
    assert "1 of 2 texts analysed" in index and index.count('href="report-') == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device every write to fails ENOSPC)")
@pytest.mark.parametrize("full", ["out/report-0002.html", "figures/text-0002/figures.json"])
def test_a_batch_that_runs_out_of_disk_stops_in_one_line_and_keeps_its_reports(gpt2_path, tmp_path, capsys, full):
    """A full disk (here a file of text 2 a link to /dev/full, whose writes fail with ENOSPC) was each later text's
    failure: one warning per text, every text still analysed (hours for thousands), a report cut short and empty
    ones left as if written, and at the end an empty corpus.html and no index. The batch stops at the first file it
    cannot write, in one line and exit 2, the reports before it whole and nothing cut short or empty beside them."""
    out = tmp_path / "out"
    (tmp_path / full).parent.mkdir(parents=True)
    (tmp_path / full).symlink_to("/dev/full")
    (tmp_path / "b.txt").write_text("First text here.\nSecond text here.\nThird text here.\n")
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "b.txt", "--out-dir", out, "--layer", 0,
                        "--figures", tmp_path / "figures", "--format", "svg")
    assert_one_line_error(code, err, rf"Cannot write .*{re.escape(Path(full).name)}: No space left on device\. The "
                                     r"batch stopped at text 2 of 3: the 1 report before it is in ")
    assert sorted(p.name for p in out.iterdir()) == ["report-0001.html"]  # the link, not /dev/full, is gone
    assert read_report_results(out / "report-0001.html")["text"] == "First text here."
    assert not (tmp_path / "figures" / "text-0003").exists()  # the third text was not analysed


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device every write to fails ENOSPC)")
def test_a_disk_full_at_the_corpus_page_keeps_the_reports_and_leaves_no_empty_page(gpt2_path, tmp_path, capsys,
                                                                                  monkeypatch):
    """The disk filled by the time corpus.html was written (here it becomes a link to /dev/full then): an empty
    corpus.html was left beside the reports, and the error did not say what the folder holds."""
    import reports.html

    render = reports.html.render_corpus_report

    def full_disk_then_render(*args, **kwargs):
        (tmp_path / "out" / "corpus.html").symlink_to("/dev/full")
        return render(*args, **kwargs)

    monkeypatch.setattr(reports.html, "render_corpus_report", full_disk_then_render)
    (tmp_path / "b.txt").write_text("First text here.\nSecond text here.\n")
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "b.txt", "--out-dir", tmp_path / "out")
    assert_one_line_error(code, err, r"Cannot write .*corpus\.html: No space left on device\. The batch stopped at "
                                     r"corpus\.html: the 2 reports before it are in ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report-0001.html", "report-0002.html"]


def test_a_second_batch_into_a_folder_being_written_is_refused(gpt2_path, tmp_path, capsys):
    """Two batches into one --out-dir at once both ended 'N reports, 0 failed' and exit 0, and the first one's index
    listed reports the second had written over (other texts under their numbers) or removed as 'of an earlier batch'
    (3 of 20 wrong and 11 missing in a run by hand). The second is refused in one line while the first writes (here
    a real command in another process, held after its first report until the test lets it go on)."""
    import subprocess
    import sys
    import time

    out, go = tmp_path / "out", tmp_path / "go"
    texts = ["The first batch's first text.", "The first batch's second text."]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "b.txt").write_text("Another batch, first.\nAnother batch, second.\n")
    held = ("import sys, time; from pathlib import Path; import reports.__main__ as cli\n"
            "write = cli._write_batch_entry\n"
            "def held(number, *rest):\n"
            "    entry = write(number, *rest)\n"
            "    while number == 1 and not Path(sys.argv[1]).exists(): time.sleep(0.1)\n"
            "    return entry\n"
            "cli._write_batch_entry = held\n"
            "sys.exit(cli.main(sys.argv[2:]))")
    first = subprocess.Popen([sys.executable, "-c", held, str(go), "--model", str(gpt2_path), "--batch",
                              str(tmp_path / "a.txt"), "--out-dir", str(out), "--layer", "0"],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "report-0001.html").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "b.txt", "--out-dir", out,
                            "--layer", 0)
        assert_one_line_error(code, err, rf"is being written by another headscope batch \(process {first.pid}\)")
        code, err = run_cli(capsys, "--model", tmp_path / "no-model", "--batch", tmp_path / "b.txt", "--out-dir",
                            out)  # refused before its model loads (it loaded the whole model first), not for its model
        assert_one_line_error(code, err, rf"is being written by another headscope batch \(process {first.pid}\)")
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert [read_report_results(out / f"report-{i:04d}.html")["text"] for i in (1, 2)] == texts
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "b.txt", "--out-dir", out, "--layer", 0)
    assert code == 0, err  # the first batch over: its lock went with it


def test_a_second_run_into_a_results_folder_being_written_is_refused(gpt2_path, tmp_path, capsys):
    """Two --batch --results runs into one DIR at once each read the rows at the start and analysed every text without
    one: both ended with exit 0, and the folder held one input's rows twice (or, into a new folder, two inputs' rows
    under the same numbers). The second is refused in one line, before its model loads, while the first writes (here
    a real command in another process, a rerun held after analysing its new text until the test lets it go on, and
    the same command again); a reader (--from-results) takes no lock and reads the rows already there meanwhile."""
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq

    from analysis.corpus_store import ResultsFolder

    results, go = tmp_path / "res", tmp_path / "go"
    texts = ["The first input's first text.", "The first input's second text."]
    (tmp_path / "a.txt").write_text(texts[0] + "\n")
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "a.txt", "--results", results)
    assert code == 0, err
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")  # a line added: the rerun analyses it alone
    held = ("import sys, time; from pathlib import Path; import analysis.corpus_store as store\n"
            "import reports.__main__ as cli\n"
            "analyse = store.analyze_records\n"
            "def held(*args, **kwargs):\n"
            "    rows = analyse(*args, **kwargs)\n"
            "    Path(sys.argv[1] + '.held').touch()\n"
            "    while not Path(sys.argv[1]).exists(): time.sleep(0.1)\n"
            "    return rows\n"
            "store.analyze_records = held\n"
            "sys.exit(cli.main(sys.argv[2:]))")
    first = subprocess.Popen([sys.executable, "-c", held, str(go), "--model", str(gpt2_path), "--batch",
                              str(tmp_path / "a.txt"), "--results", str(results)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "go.held").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "a.txt", "--results", results)
        assert_one_line_error(code, err, rf"is being written by another headscope run \(process {first.pid}\)")
        code, err = run_cli(capsys, "--model", tmp_path / "no-model", "--batch", tmp_path / "a.txt", "--results",
                            results)  # refused before the model loads, not for its model
        assert_one_line_error(code, err, rf"is being written by another headscope run \(process {first.pid}\)")
        code, err = run_cli(capsys, "--from-results", results, "--json", tmp_path / "during.json")
        assert code == 0, err
        assert [text["excerpt"] for text in json.loads((tmp_path / "during.json").read_text())["texts"]] == texts[:1]
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert ResultsFolder(results).read_rows(["excerpt"])["excerpt"].to_pylist() == texts
    parts = ResultsFolder(results).part_files()
    assert sorted(number for part in parts for number in pq.read_table(part)["number"].to_pylist()) == [1, 2]  # once
    assert not (results / ".headscope-batch.lock").exists()
    code, err = run_cli(capsys, "--model", gpt2_path, "--batch", tmp_path / "a.txt", "--results", results)
    assert code == 0, err  # the first run over: its lock went with it


@pytest.mark.parametrize("flag", ["--out-dir", "--results"])
def test_a_batch_that_fails_before_writing_leaves_no_folder_it_made(flag, tmp_path, capsys):
    """The --out-dir or --results DIR is made to hold the lock before the model loads: a batch whose model then fails
    to load removes it again, and the parents made for it, leaving no empty folder that was not there before; an
    existing folder stays and keeps nothing of the run (not its lock file)."""
    (tmp_path / "a.txt").write_text("A text.\n")
    code, err = run_cli(capsys, "--model", tmp_path / "no-model", "--batch", tmp_path / "a.txt", flag,
                        tmp_path / "runs" / "out")
    assert code == 2 and len(err) == 1, err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "there").mkdir()
    code, err = run_cli(capsys, "--model", tmp_path / "no-model", "--batch", tmp_path / "a.txt", flag,
                        tmp_path / "there")
    assert code == 2 and len(err) == 1, err
    assert (tmp_path / "there").is_dir() and not any((tmp_path / "there").iterdir())


def test_ctrl_c_is_one_line_and_keeps_the_reports_written(gpt2_path, tmp_path):
    """Ctrl-C in a batch printed Python's KeyboardInterrupt traceback from wherever the pass was. It is one line on
    stderr, exit status 130 (a shell's for SIGINT), and the reports written before it stay (here a real command in
    another process, interrupted once its first report is written)."""
    import signal
    import subprocess
    import sys
    import time

    from reports.__main__ import EXIT_INTERRUPTED, INTERRUPTED

    out = tmp_path / "out"
    (tmp_path / "a.txt").write_text("The first text.\nThe second text.\n")
    held = ("import sys, time; import reports.__main__ as cli\n"
            "write = cli._write_batch_entry\n"
            "def held(number, *rest):\n"
            "    entry = write(number, *rest)\n"
            "    while number == 1: time.sleep(0.1)\n"
            "    return entry\n"
            "cli._write_batch_entry = held\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    batch = subprocess.Popen([sys.executable, "-c", held, "--model", str(gpt2_path), "--batch", str(tmp_path / "a.txt"),
                              "--out-dir", str(out), "--layer", "0"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "report-0001.html").exists() and batch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    batch.send_signal(signal.SIGINT)
    _, err = batch.communicate(timeout=300)
    assert batch.returncode == EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err, err
    assert read_report_results(out / "report-0001.html")["text"] == "The first text."
