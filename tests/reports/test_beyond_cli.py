"""The command line's --ablation, --neuron, --compare and --revision, and the report sections they add."""

import html
import json
import re
import shutil

import numpy as np
import pytest

from analysis import load_model
from analysis.ablation import compute_ablation
from reports.html import read_report_results
from tests.conftest import REPEATS
from tests.lm_checkpoints import tiny_gpt2_lm
from tests.reports.test_cli import assert_one_line_error, run_cli
from tests.reports.test_html import PAYLOAD
from tests.reports.test_provenance import assert_same_results
from tests.reports.test_report_browser import DRAWN, open_offline, wait_for_charts


@pytest.fixture(scope="module")
def lm_paths(tmp_path_factory):
    return [tiny_gpt2_lm(tmp_path_factory.mktemp(f"cli-seed{seed}"), seed=seed) for seed in (0, 1)]


def test_ablation_and_neuron_go_into_the_json(lm_paths, tmp_path, capsys):
    out = tmp_path / "out.json"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--text", REPEATS, "--layer", 1, "--head", 2,
                          "--ablation", "mean", "--ablation-batch", 5, "--neuron", -1, 3, "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert data["schema"] == "headscope.results/1" and data["ablation"]["measure"] == "next_token_loss"
    expected = compute_ablation(load_model(str(lm_paths[0]), head=True), REPEATS, "mean").delta
    np.testing.assert_allclose(data["ablation"]["delta"], expected, atol=1e-5)
    assert data["ablation"]["n_passes"] == 1 + 3  # 12 heads in batches of 5
    neuron = data["neuron"]
    assert (neuron["layer"], neuron["head"], neuron["key_pos"]) == (1, 2, 3)
    assert abs(sum(neuron["products"]) - neuron["dot"]) < 1e-5


def test_compare_two_seeds_writes_the_compare_document_and_report(lm_paths, tmp_path, capsys):
    out, html = tmp_path / "compare.json", tmp_path / "compare.html"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", lm_paths[1], "--text", REPEATS,
                          "--all-layers", "--ablation", "zero", "--json", out, "--html", html)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert data["schema"] == "headscope.compare/1"
    assert data["a"]["model"]["revision"] != data["b"]["model"]["revision"]
    entropy = np.array(data["score_difference"]["entropy"], dtype=float)
    np.testing.assert_allclose(entropy, np.array(data["b"]["head_scores"]["entropy"], dtype=float)
                               - np.array(data["a"]["head_scores"]["entropy"], dtype=float))
    assert len(data["qk_stats"]) == 3 * 4 and data["ablation"]["difference"] is not None
    page = html.read_text()
    for anchor in ('id="compare"', 'id="ablation"', 'id="headscope-beyond"', "chart-compare-entropy-difference"):
        assert anchor in page


def test_compare_headings_draw_the_model_ids_visibly_and_isolated(lm_paths, tmp_path, capsys):
    """A model directory named with a right-to-left override: the headings name both models escaped, visible and in
    <bdi>, like every other user string of a report (a raw override once reordered the heading), and so does the
    warning that the two shapes differ."""
    other = tmp_path / "model\u202eB"
    tiny_gpt2_lm(other, n_layer=1)  # another depth: the report warns that there is no difference
    html = tmp_path / "c.html"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", other, "--text", REPEATS, "--html", html)
    assert code == 0, lines
    page = html.read_text(encoding="utf-8")
    assert "\u202e" not in page and "B = <bdi>" in page and "model⟨U+202E⟩B</bdi></h2>" in page
    assert re.search(r'<p class="warning"><bdi>[^<]*model⟨U\+202E⟩B 1 x 4: the atlases', page)


def test_compare_without_a_layer_takes_one_both_models_have(lm_paths, tmp_path, capsys):
    """A's default layer (1 of 3) is past a 1-layer B: with no --layer the comparison takes the default of the
    shallower model instead of refusing a layer the user never named."""
    shallow = tiny_gpt2_lm(tmp_path / "shallow", n_layer=1)
    out = tmp_path / "c.json"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", shallow, "--text", REPEATS, "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert list(data["a"]["layers"]) == list(data["b"]["layers"]) == ["0"]
    import shlex  # the recorded command names that layer (it named A's default, which B lacks) and recomputes it

    again = shlex.split(data["provenance"]["command"])[3:]
    assert again[again.index("--layer") + 1] == "0" and again.count("--layer") == 1
    again[again.index("--json") + 1] = str(tmp_path / "again.json")
    assert run_cli(capsys, *again)[0] == 0
    assert json.loads((tmp_path / "again.json").read_text())["score_difference"] == data["score_difference"]


def test_compare_of_two_depths_records_a_command_that_measures_each_models_every_layer(lm_paths, tmp_path, capsys):
    """--all-layers with a deeper B measures B's every layer: the recorded command listed A's layers (--layer 0 1 2)
    instead, so it recomputed B without its last layer; it says --all-layers (and the neuron view's default layer)."""
    import shlex

    deeper = tiny_gpt2_lm(tmp_path / "deeper", n_layer=4)
    out = tmp_path / "c.json"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", deeper, "--text", REPEATS, "--all-layers",
                          "--neuron", -1, 0, "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert list(data["b"]["layers"]) == ["0", "1", "2", "3"] and len(data["qk_stats"]) == 4 * 4
    again = shlex.split(data["provenance"]["command"])[3:]
    again[again.index("--json") + 1] = str(tmp_path / "again.json")
    assert run_cli(capsys, *again)[0] == 0
    rerun = json.loads((tmp_path / "again.json").read_text())
    assert list(rerun["b"]["layers"]) == list(data["b"]["layers"])
    assert_same_results(rerun["qk_stats"], data["qk_stats"])
    assert_same_results(rerun["neuron"], data["neuron"])


def test_compare_with_a_shallower_model_and_the_neuron_view_records_a_command_that_runs(lm_paths, tmp_path,
                                                                                         capsys):
    """No --layer, B shallower than A's default layer: the neuron view was drawn on A's default (1) and the
    comparison on B's (0), so the recorded command said --layer 1 --layer 0 and failed ('Layer 1 is out of range',
    exit 2); the neuron view is on the layer the comparison measures, and the command recomputes the document."""
    import shlex

    shallow = tiny_gpt2_lm(tmp_path / "shallow", n_layer=1)
    out = tmp_path / "c.json"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", shallow, "--text", REPEATS, "--neuron", -1, 0,
                          "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert data["neuron"]["layer"] == 0 and list(data["a"]["layers"]) == ["0"]
    again = shlex.split(data["provenance"]["command"])[3:]
    again[again.index("--json") + 1] = str(tmp_path / "again.json")
    code, lines = run_cli(capsys, *again)
    assert code == 0, lines
    rerun = json.loads((tmp_path / "again.json").read_text())
    assert_same_results([rerun["neuron"], rerun["qk_stats"]], [data["neuron"], data["qk_stats"]])


def test_compare_with_a_shallower_model_reports_the_layer_its_command_recomputes(lm_paths, tmp_path, capsys):
    """No --layer, B shallower than A's default layer: the report's own sections showed A's default layer (1) while
    the comparison and the recorded command (--layer 0) were on the one both have; the whole report is on that
    layer now, and its command recomputes the page's results."""
    import shlex

    shallow = tiny_gpt2_lm(tmp_path / "shallow", n_layer=1)
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", shallow, "--text", REPEATS, "--html",
                          tmp_path / "c.html")
    assert code == 0, lines
    results = read_report_results(tmp_path / "c.html")
    assert list(results["layers"]) == ["0"]  # the layer of the comparison, not A's default 1
    command = shlex.split(html.unescape(re.search(r"<pre>(.*?)</pre>", (tmp_path / "c.html").read_text(),
                                                  re.DOTALL)[1]))[3:]
    command[command.index("--html") + 1] = str(tmp_path / "again.html")
    code, lines = run_cli(capsys, *command)
    assert code == 0, lines
    again = read_report_results(tmp_path / "again.html")
    assert_same_results([again["layers"], again["head_scores"]], [results["layers"], results["head_scores"]])


def test_compare_measures_both_models_with_the_query_and_exclusions(lm_paths, tmp_path, capsys):
    """--query-position, --exclude-special-keys and --include-bos reach both models (they were ignored, so the
    B - A difference was computed without them)."""
    out = tmp_path / "c.json"
    flags = ["--query-position", 3, "--include-bos", "--layer", 1]
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", lm_paths[1], "--text", REPEATS, *flags,
                          "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    for side, path in (("a", lm_paths[0]), ("b", lm_paths[1])):
        alone = tmp_path / f"{side}.json"
        assert run_cli(capsys, "--model", path, "--text", REPEATS, *flags, "--json", alone)[0] == 0
        want = json.loads(alone.read_text())
        settings = data[side]["settings"]
        assert settings["query_position"] == want["settings"]["query_position"] == 3 and not settings["exclude_bos"]
        assert data[side]["head_scores"] == want["head_scores"] and data[side]["layers"]["1"]["same_head_dp"] == \
            want["layers"]["1"]["same_head_dp"]


@pytest.mark.parametrize("argv, needles", [
    (["--compare", "OTHER"], ["does not use the same tokenizer"]),
    (["--revision", "main"], ["applies to Hugging Face hub ids only"]),
    (["--neuron", 3, 40], ["Key position 40 comes after query position 3"]),
    (["--neuron", 0, 0, "--head", 9], ["Head 9 is out of range"]),
])
def test_bad_input_is_one_line_and_exit_2(lm_paths, tmp_path, capsys, argv, needles):
    other = tiny_gpt2_lm(tmp_path / "other-vocab", vocab_size=400)
    argv = [other if arg == "OTHER" else arg for arg in argv]
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--text", REPEATS * 3, *argv, "--json", tmp_path / "x.json")
    assert code == 2
    assert_one_line_error(code, lines, *needles)


@pytest.mark.parametrize("argv, needle", [
    (["--batch", "BATCH", "--out-dir", "DIR", "--ablation", "zero"], "not on --batch"),
    (["--compare", "x", "--induction-probe", 8, "--json", "-"], "--compare runs both models on a text"),
    (["--compare-revision", "main", "--json", "-"], "--compare-revision needs --compare"),
    (["--batch", "BATCH", "--results", "DIR", "--exclude-special-keys"], "--exclude-special-keys: Parquet results"),
    (["--from-results", "DIR", "--include-bos", "--json", "-"], "--include-bos: Parquet results"),
    (["--batch", "BATCH", "--out-dir", "DIR", "--text-column", "body"], "--text-column is read by --batch FILE"),
    (["--ablation-batch", 0, "--ablation", "zero", "--json", "-"], "at least 1"),
    (["--mask-seed", -1, "--ablation", "zero", "--json", "-"], "--mask-seed must be a whole number in 0..4294967295"),
    (["--mask-seed", 2**32, "--ablation", "zero", "--json", "-"], "not 4294967296"),
    # the ablation's own settings without an ablation: the run went on as if they had not been typed
    (["--mask-seed", 3, "--json", "-"], "--mask-seed is read by --ablation only: add --ablation zero|mean"),
    (["--mask-seed", 3, "--ablation-batch", 2, "--json", "-"], "--mask-seed, --ablation-batch are read by --ablation"),
    # sections computed, then written nowhere: --figures draws the analysis's figures only
    (["--ablation", "zero", "--figures", "FIGS"], "--ablation adds a section to the --html report or the --json"),
    (["--neuron", 0, 1, "--compare", "x", "--figures", "FIGS"], "--neuron, --compare add a section to the --html"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, argv, needle):
    batch = tmp_path / "texts.txt"
    batch.write_text("one\ntwo\n")
    argv = [{"BATCH": batch, "DIR": tmp_path, "FIGS": tmp_path / "figs"}.get(arg, arg) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, *argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_revision_picks_the_cached_snapshot_of_a_hub_id(lm_paths, tmp_path, capsys, monkeypatch):
    """A hub cache holding two revisions of one repo (as Pythia's step checkpoints): --revision picks each."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    commits = {"step1": "1" * 40, "step2": "2" * 40}
    for (ref, commit), source in zip(commits.items(), lm_paths):
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "out.json"
    code, lines = run_cli(capsys, "--model", "someone/tiny", "--revision", "step1", "--compare", "someone/tiny",
                          "--compare-revision", "step2", "--text", REPEATS, "--layer", 1, "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert data["a"]["model"]["revision"] == commits["step1"] and data["b"]["model"]["revision"] == commits["step2"]
    command = data["provenance"]["command"]  # both pinned to the commits they ran at (the refs may move on)
    assert f"--revision {commits['step1']}" in command and f"--compare-revision {commits['step2']}" in command
    batch = tmp_path / "texts.txt"  # --batch loads the revision asked for too (it was ignored: main was loaded)
    batch.write_text("the cat sat\n")
    for output in (["--out-dir", tmp_path / "pages"], ["--results", tmp_path / "rows"]):
        code, lines = run_cli(capsys, "--model", "someone/tiny", "--revision", "step2", "--batch", batch, *output)
        assert code == 0, lines
    assert json.loads((tmp_path / "rows" / "corpus.json").read_text())["model"]["revision"] == commits["step2"]
    code, lines = run_cli(capsys, "--model", "someone/tiny", "--revision", "step9", "--json", out)
    assert_one_line_error(code, lines, "someone/tiny@step9", "not in the local Hugging Face cache")


def test_report_sections_draw_offline(chromium, lm_paths, tmp_path, capsys):
    html = tmp_path / "beyond.html"
    code, lines = run_cli(capsys, "--model", lm_paths[0], "--compare", lm_paths[1], "--text", PAYLOAD, "--layer", 1,
                          "--ablation", "zero", "--neuron", -1, 0, "--html", html)
    assert code == 0, lines
    context, page, events = open_offline(chromium, html)
    try:
        wait_for_charts(page)
        for section in ("#ablation", "#neuron", "#compare"):
            containers = page.query_selector_all(f"{section} [data-chart]")
            assert containers, section
            for container in containers:
                assert container.evaluate(DRAWN) > 0, container.get_attribute("data-chart")
        assert events["errors"] == [] and events["requests"] == [html.as_uri()]
        assert page.title() != "pwned" and page.evaluate("document.querySelectorAll('img').length") == 0
        assert page.evaluate("document.querySelectorAll('script:not([type])').length") == 2
        links = page.eval_on_selector_all("nav.layers:first-of-type a", "links => links.map(a => a.hash)")
        assert {"#ablation", "#neuron", "#compare"} <= set(links), links  # the sections nav names them too
        for link in links:
            assert page.query_selector(link) is not None, link
    finally:
        context.close()


def test_the_reports_command_recomputes_its_sections(lm_paths, tmp_path, capsys):
    import html as html_lib
    import re
    import shlex

    first, report = tmp_path / "first.json", tmp_path / "report.html"
    argv = ["--model", lm_paths[0], "--text", REPEATS, "--layer", 2, "--layer", 0, "--head", 1, "--ablation", "mean",
            "--mask-seed", 4, "--neuron", -1, 2, "--compare", lm_paths[1]]
    code, lines = run_cli(capsys, *argv, "--json", first, "--html", report)
    assert code == 0, lines
    shown = re.search(r"Reproduce with</dt><dd><pre>(.*?)</pre>", report.read_text(), re.DOTALL)[1]
    command = html_lib.unescape(shown)
    again = shlex.split(command)[3:]  # after "python -m reports"
    assert again[again.index("--html") + 1] == "report.html" and again.count("--ablation") == 1
    again[again.index("--html"):again.index("--html") + 2] = ["--json", str(tmp_path / "again.json")]
    code, lines = run_cli(capsys, *again)
    assert code == 0, lines
    one, two = json.loads(first.read_text()), json.loads((tmp_path / "again.json").read_text())
    assert one["neuron"] == two["neuron"] and one["neuron"]["layer"] == 2
    json_command = shlex.split(one["provenance"]["command"])
    assert json_command[-2:] == ["--json", "results.json"] and "--compare" in json_command
    assert json_command[json_command.index("--neuron") + 1:][:2] == [str(one["neuron"]["query_pos"]), "2"]
    assert one["ablation"] == two["ablation"] and one["score_difference"] == two["score_difference"]


def test_an_encoders_ablation_section_names_its_mask_seed(tmp_path, capsys):
    """A masked LM's ablation loss is over a seeded 15% of positions: the section listed the positions but not the
    seed that chose them (only the command and the JSON had it); it names the seed beside the positions, which are
    analysis.ablation.mask_positions's for that seed."""
    import torch

    from analysis.ablation import mask_positions
    from tests.lm_checkpoints import tiny_bert_mlm

    path = tiny_bert_mlm(tmp_path / "bert-mlm")
    code, lines = run_cli(capsys, "--model", path, "--text", REPEATS, "--ablation", "zero", "--mask-seed", 7,
                          "--html", tmp_path / "r.html")
    assert code == 0, lines
    page = (tmp_path / "r.html").read_text()
    shown = re.search(r"<p>Masked positions \(mask seed (\d+), the same for every head\):(.*?)</p>", page, re.DOTALL)
    assert shown and shown[1] == "7"
    loaded = load_model(str(path), head=True)
    ids = torch.as_tensor(loaded.tokenizer(REPEATS)["input_ids"])[None]  # [batch=1, pos]
    assert [int(p) for p in re.findall(r"<code>(\d+): ", shown[2])] == mask_positions(loaded, ids, 7).tolist()
