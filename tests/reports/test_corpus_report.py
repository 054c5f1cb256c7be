"""--batch also writes corpus.html: atlases of means over the texts with bootstrap intervals, linked from index.html."""

from __future__ import annotations

import json
import re

import pytest

from analysis import analyze
from analysis.corpus import CORPUS_MEASURES
from reports.__main__ import main
from reports.html import read_report_results, shared_assets_name, vega_bundle
from tests.conftest import FIJI, REPEATS
from tests.reports.test_provenance import assert_same_results
from tests.reports.test_report_browser import DRAWN, open_offline, wait_for_charts

TEXTS = [FIJI, "   ", REPEATS, "The dog ran home.", "A cat sat on the mat again."]


def test_batch_writes_a_corpus_report_from_the_same_passes(gpt2, gpt2_path, tmp_path, capsys):
    batch = tmp_path / "texts.jsonl"
    batch.write_text("\n".join(json.dumps({"text": text}) for text in TEXTS) + "\n")
    out = tmp_path / "archive"
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(out)]) == 0
    assert "means over the texts" in capsys.readouterr().err
    index = (out / "index.html").read_text()
    assert 'href="corpus.html"' in index and index.count('href="report-') == 4
    page = (out / "corpus.html").read_text()
    block = re.search(r'<script type="application/json" id="headscope-corpus">(.*?)</script>', page, re.DOTALL)
    data = json.loads(block[1])
    assert data["n_texts"] == 5 and data["n_analysed"] == 4
    assert [t["error"] for t in data["texts"]][1] == "The text is empty: type a sentence to analyse."
    good = [text for text in TEXTS if text.strip()]
    induction = [analyze(gpt2, text, layers=[6]).head_scores["induction"] for text in good]
    assert data["stats"]["induction"]["mean"][6][3] == pytest.approx(sum(s[6, 3] for s in induction) / 4, rel=1e-12)
    for name in CORPUS_MEASURES:
        assert page.count(f'data-chart="chart-corpus-{name}"') == 1
    assert "adding a constant to every key" in page and "Failed texts" in page
    assert "resamples of the texts, seed 0" in page


def test_the_corpus_report_draws_offline(chromium, gpt2_path, tmp_path, capsys):
    batch = tmp_path / "texts.txt"
    batch.write_text("\n".join(text for text in TEXTS if text.strip()) + "\n")
    out = tmp_path / "o"
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(out)]) == 0
    path = out / "corpus.html"
    context, page, events = open_offline(chromium, path)
    try:
        wait_for_charts(page)
        containers = page.query_selector_all("[data-chart]")
        assert len(containers) == len(CORPUS_MEASURES)
        for container in containers:
            assert container.evaluate(DRAWN) > 0, container.get_attribute("data-chart")
        assert events["errors"] == [] and events["requests"] == [path.as_uri()]
    finally:
        context.close()


def test_shared_assets_one_copy_of_the_javascript_still_offline(chromium, gpt2_path, tmp_path, capsys):
    batch = tmp_path / "texts.txt"
    batch.write_text("\n".join(text for text in TEXTS if text.strip()) + "\n")
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(alone)]) == 0
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(shared), "--shared-assets"]) == 0
    assert not (alone / "assets").exists()
    bundle = vega_bundle()
    [asset] = (shared / "assets").iterdir()
    assert asset.read_text() == bundle and asset.name == shared_assets_name().split("/")[1]
    pages = sorted(p.name for p in shared.glob("*.html"))
    assert pages == sorted(p.name for p in alone.glob("*.html"))
    for name in pages:
        if name == "index.html":
            continue
        standalone, light = (alone / name).read_text(), (shared / name).read_text()
        assert bundle in standalone and bundle not in light
        assert f'<script src="assets/{asset.name}"></script>' in light
        assert len(light.encode()) < len(standalone.encode()) - len(bundle.encode()) + 2000
        csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', light)[1]
        assert "script-src &#39;self&#39; &#39;sha256-" in csp and "connect-src &#39;none&#39;" in csp
        if name != "corpus.html":
            assert read_report_results(shared / name) == read_report_results(alone / name)
    for name in ("report-0001.html", "corpus.html"):
        path = shared / name
        context, page, events = open_offline(chromium, path)
        try:
            wait_for_charts(page)
            for container in page.query_selector_all("[data-chart]"):
                assert container.evaluate(DRAWN) > 0, container.get_attribute("data-chart")
            assert events["errors"] == []
            assert events["requests"] == [path.as_uri(), (shared / "assets" / asset.name).as_uri()]
        finally:
            context.close()


def _corpus_settings(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="headscope-corpus">(.*?)</script>', page,
                                re.DOTALL)[1])["settings"]


def test_the_corpus_report_says_which_query_token_and_keys_its_means_used(gpt2_path, tmp_path, capsys):
    """--batch --out-dir measures the corpus with --query-position, --exclude-special-keys and --include-bos (its
    dot-product effect sizes change with them), but corpus.html said only the first and current token settings:
    two corpus pages of different numbers claimed the same settings. They now say what each report's own results
    record."""
    batch = tmp_path / "texts.txt"
    batch.write_text("The cat sat on the mat.\nA dog ran to the old house.\n")
    pages = {}
    for name, flags in {"default": [], "chosen": ["--query-position", "3", "--exclude-special-keys",
                                                  "--include-bos"]}.items():
        out = tmp_path / name
        assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(out), *flags]) == 0
        report = read_report_results(out / "report-0001.html")["settings"]
        page = (out / "corpus.html").read_text()
        settings = _corpus_settings(page)
        assert settings["exclude_special_keys"] == report["exclude_special_keys"]
        assert settings["exclude_bos"] == report["exclude_bos"]
        pages[name] = (page, settings)
    assert pages["default"][1]["query_position"] is None and pages["chosen"][1]["query_position"] == 3
    assert pages["chosen"][1]["exclude_special_keys"] and not pages["chosen"][1]["exclude_bos"]
    shown = {name: re.search(r"<dt>Settings</dt><dd>(.*?)</dd>", page)[1] for name, (page, _) in pages.items()}
    assert shown["default"] != shown["chosen"], shown
    assert "query token: position 3" in shown["chosen"] and "exclude special keys: yes" in shown["chosen"]


def test_the_corpus_report_names_the_token_whose_dot_products_it_averages(minilm, gpt2, gpt2_path, tmp_path,
                                                                          capsys):
    """The per-layer effect sizes are of each text's query token, which on an encoder is its last word: the page
    called them "final-token dot products" ("where the final token looks"), and an encoder's final token is
    [SEP], whose effect sizes are other numbers. The page names the token the numbers are of, causal or not."""
    text = "The cat sat on the mat."
    batch = tmp_path / "texts.txt"
    batch.write_text(text + "\n")
    for name, loaded, model in (("minilm", minilm, "minilm"), ("gpt2", gpt2, str(gpt2_path))):
        out = tmp_path / name
        assert main(["--model", model, "--batch", str(batch), "--out-dir", str(out)]) == 0, capsys.readouterr().err
        page = (out / "corpus.html").read_text()
        said = re.sub(r"\s+", " ", re.search(r'<section id="corpus-layers">\s*<h2>.*?</h2>\s*<p>(.*?)</p>', page,
                                                re.DOTALL)[1])
        assert "final-token" not in said and "where the query token looks" in said
        means = json.loads(re.search(r'<script type="application/json" id="headscope-corpus">(.*?)</script>', page,
                                     re.DOTALL)[1])["stats"]["rank_biserial"]["mean"]  # [layer]
        default, final = analyze(loaded, text), analyze(loaded, text, query_position=-1)

        def effect_sizes(result):  # [layer]
            return [result.layers[layer].dp_stats.rank_biserial for layer in sorted(result.layers)]

        assert means == pytest.approx(effect_sizes(default), rel=1e-4, abs=1e-6)
        if name == "minilm":  # the numbers are the last word's ('.'), not the final token's ([SEP])
            assert (default.query_token, final.query_token) == (".", "[SEP]")
            assert means != pytest.approx(effect_sizes(final), rel=1e-3)
            assert "its last token that is not a special one" in said and "[SEP]" in said
        else:
            assert default.query == final.query and "its final token, the default for causal models" in said


def test_a_shared_assets_page_moved_without_its_folder_says_why_it_draws_nothing(chromium, gpt2_path, tmp_path,
                                                                                  capsys):
    """A --shared-assets report copied out of its folder (without assets/) loaded no Vega and every chart box
    stayed blank, without a word: the charts' error message was never reached (vegaEmbed was not defined). Each
    box now says which file is missing and that the folder moves as a whole."""
    batch = tmp_path / "texts.txt"
    batch.write_text("The cat sat on the mat.\n")
    out = tmp_path / "shared"
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(out), "--shared-assets"]) == 0
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("report-0001.html", "corpus.html"):
        path = moved / name
        path.write_bytes((out / name).read_bytes())
        context, page, _ = open_offline(chromium, path)
        try:
            page.wait_for_function("() => [...document.querySelectorAll('[data-chart]')].every("
                                   "el => el.textContent.includes('could not be drawn'))", timeout=30_000)
            for container in page.query_selector_all("[data-chart]"):
                said = container.text_content()
                assert shared_assets_name() in said and "--shared-assets" in said, said
        finally:
            context.close()


def test_the_batch_pages_name_their_input_and_the_command_that_wrote_them(gpt2_path, tmp_path, capsys, monkeypatch):
    """An archived batch says what produced it: its input file with the SHA-256 of its bytes, and the command as
    typed, which run again (from the same folder, as it was) writes the same corpus numbers."""
    import hashlib
    import shlex
    from html import unescape

    batch = tmp_path / "my texts.txt"  # a space: the command must quote it
    batch.write_text("The cat sat on the mat.\nA dog ran to the old house.\n")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(gpt2_path), "--batch", "my texts.txt", "--out-dir", "archive", "--layer", "2",
            "--query-position", "3"]
    assert main(argv) == 0
    digest = hashlib.sha256(batch.read_bytes()).hexdigest()
    commands = []
    for name in ("index.html", "corpus.html"):
        page = (tmp_path / "archive" / name).read_text()
        facts = dict(re.findall(r"<dt>(Input|Run with)</dt><dd>(.*?)</dd>", page, re.DOTALL))
        assert "my texts.txt" in facts["Input"] and f"SHA-256 <code>{digest}</code>" in facts["Input"], name
        command = shlex.split(unescape(re.fullmatch(r"<pre>(.*)</pre>", facts["Run with"], re.DOTALL)[1]))
        assert command == ["python", "-m", "reports", *argv], name
        commands.append(command)
    first = _corpus_stats(tmp_path / "archive" / "corpus.html")
    assert main(commands[1][3:]) == 0  # the command run again
    assert_same_results(_corpus_stats(tmp_path / "archive" / "corpus.html"), first)


def _corpus_stats(path) -> dict:
    page = path.read_text()
    return json.loads(re.search(r'<script type="application/json" id="headscope-corpus">(.*?)</script>', page,
                                re.DOTALL)[1])["stats"]
