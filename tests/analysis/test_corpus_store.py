"""Corpus results as Parquet (local engine): rows equal the in-memory corpus, aggregates too, and reruns resume."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis import HeadscopeError, analyze, corpus_store
from analysis.corpus import CORPUS_MEASURES, LAYER_MEASURES, UNEXPECTED, analyze_corpus
from analysis.corpus_io import iter_records
from analysis.corpus_store import ROW_SCHEMA, ResultsFolder, load_results, run_local
from tests.analysis import test_corpus
from tests.analysis.test_corpus import short_texts
from tests.reference import assert_rank_statistics_close

one_thread = test_corpus.one_thread  # autouse: the tiny model runs fastest on one thread


@pytest.fixture
def counted(monkeypatch):
    """Every text the engine runs the model on."""
    seen = []
    real = corpus_store.capture_texts

    def spy(loaded, texts, *args):
        seen.extend(texts)
        return real(loaded, texts, *args)

    monkeypatch.setattr(corpus_store, "capture_texts", spy)
    return seen


def write_input(tmp_path, texts):
    """A .txt corpus with a blank line, and a text longer than the tiny model's 128 positions (the engine refuses)."""
    lines = [*texts[:3], "", " ".join(["cat"] * 300), *texts[3:]]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rows_and_aggregates_equal_the_in_memory_corpus(gpt2, tmp_path, counted):
    texts = short_texts(30)
    path = write_input(tmp_path, texts)
    run = run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), batch_size=4, flush_rows=8)
    assert run["new_rows"] == 31 and run["skipped"] == 0 and len(counted) == 31
    folder = ResultsFolder(tmp_path / "res")
    assert len(folder.part_files()) == 4  # 31 rows, a part every 8
    table = folder.read_rows()
    assert table.schema == ROW_SCHEMA
    assert table["number"].to_pylist() == [1, 2, 3, *range(5, 33)]  # line 4 was blank: numbering follows the file
    failed = table.filter(table["error"].is_valid())
    assert failed["number"].to_pylist() == [5] and "accepts at most 128" in failed["error"][0].as_py()
    assert failed["q_mean"][0].as_py() is None

    # ground truth: analysis.corpus over the same texts, itself checked against analyze() per text
    expected = analyze_corpus(gpt2, [*texts[:3], " ".join(["cat"] * 300), *texts[3:]])
    result = load_results(tmp_path / "res")
    assert [(t.number, t.n_tokens, t.error is None) for t in result.texts] == [
        (n, t.n_tokens, t.error is None) for n, t in zip(table["number"].to_pylist(), expected.texts)]
    for name in CORPUS_MEASURES:
        np.testing.assert_array_equal(result.values[name], expected.values[name])
    for name in LAYER_MEASURES:
        np.testing.assert_array_equal(result.layer_values[name], expected.layer_values[name])
    for name in expected.means:  # the same per-text numbers, the same seeded bootstrap
        for field in ("means", "low", "high"):
            np.testing.assert_allclose(getattr(result, field)[name], getattr(expected, field)[name], rtol=0,
                                       atol=1e-12, err_msg=f"{field} {name}")

    manifest = json.loads((tmp_path / "res" / "corpus.json").read_text())
    assert manifest["schema"] == "headscope.corpus-results/1"
    assert manifest["model"]["revision"] == gpt2.info.revision and manifest["model"]["n_layers"] == 8
    assert manifest["counts"] == {"rows": 31, "analysed": 30, "failed": 1}
    assert manifest["versions"]["pyarrow"] and manifest["versions"]["torch"]
    assert manifest["settings"] == {"exclude_first_token": True, "exclude_current_token": False, "exclude_bos": True,
                                    "unk_is_word": True, "score_definition": "seen_copies",
                                    "text_column": "text"}


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_with_only_the_remaining_texts(gpt2, tmp_path, counted):
    texts = short_texts(20, seed=1)
    path = write_input(tmp_path, texts)

    def stop_after_12(seen, written):
        if seen >= 12:
            raise Interrupted

    with pytest.raises(Interrupted):  # killed part-way: what was flushed (8 rows) stays, the rest is lost
        run_local(gpt2, iter_records(path), tmp_path / "res", batch_size=4, flush_rows=8, progress=stop_after_12)
    folder = ResultsFolder(tmp_path / "res")
    assert folder.read_rows().num_rows == 8
    counted.clear()
    run = run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), batch_size=4, flush_rows=8)
    assert run["skipped"] == 8 and run["new_rows"] == 13 and len(counted) == 13  # nothing computed twice
    whole = tmp_path / "whole"
    run_local(gpt2, iter_records(path), whole, batch_size=4)
    resumed, reference = folder.read_rows(), ResultsFolder(whole).read_rows()
    assert resumed.num_rows == 21 and resumed.equals(reference)  # nothing lost, identical rows
    counted.clear()
    again = run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    assert again["new_rows"] == 0 and again["skipped"] == 21 and counted == []
    assert [r["engine"] for r in json.loads((tmp_path / "res" / "corpus.json").read_text())["runs"]] == ["local"] * 2


def test_reading_a_folder_with_an_unreadable_part_changes_nothing_and_says_how_to_repair_it(gpt2, tmp_path,
                                                                                             capsys):
    """--from-results and the app only read a results folder: an unreadable part (a write cut short, or a network
    file system's passing error) was renamed *.broken by the reader, in a folder perhaps another's or read-only
    (then an OSError, a traceback). The reader refuses in one line and moves nothing; the run the line names sets
    the part aside and analyses its texts again."""
    from reports.__main__ import main

    texts = short_texts(4, seed=3)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), flush_rows=2)
    broken = ResultsFolder(tmp_path / "res").part_files()[0]
    lost = pq.read_metadata(broken).num_rows
    broken.write_bytes(b"PAR1 not really")  # its rows unreadable
    before = sorted(p.name for p in broken.parent.iterdir())
    with pytest.raises(HeadscopeError, match=rf"^{broken.name} cannot be read|cannot be read \("):
        load_results(tmp_path / "res")
    assert main(["--from-results", str(tmp_path / "res"), "--json", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--results {tmp_path / 'res'} to set it aside" in err[0], err
    assert sorted(p.name for p in broken.parent.iterdir()) == before and not (tmp_path / "c.json").exists()
    run = run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))  # the repair the line names
    assert run["new_rows"] == lost > 0 and load_results(tmp_path / "res").n_analysed == 4


def test_a_changed_text_is_analysed_again_and_a_broken_part_is_set_aside(gpt2, tmp_path, counted):
    texts = short_texts(6, seed=2)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), flush_rows=3)
    path.write_text("\n".join(texts[:5] + ["an edited last line"]), encoding="utf-8")
    (tmp_path / "res" / "rows" / "cut-short.parquet").write_bytes(b"PAR1 not really")  # a write killed part-way
    counted.clear()
    run = run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    assert counted == ["an edited last line"] and (run["skipped"], run["dropped"]) == (5, 1)
    assert (tmp_path / "res" / "rows" / "cut-short.parquet.broken").exists()
    parts = ResultsFolder(tmp_path / "res").part_files()
    assert sum(pq.read_metadata(part).num_rows for part in parts) == 6  # line 6's old row is gone from its part
    result = load_results(tmp_path / "res")  # line 6's new row replaces its old one
    assert [(t.number, t.excerpt) for t in result.texts] == [*[(i + 1, t) for i, t in enumerate(texts[:5])],
                                                             (6, "an edited last line")]
    assert result.n_analysed == 6


@pytest.mark.parametrize("exclude_first_token", [True, False])
def test_a_folder_from_before_exclude_bos_reads_under_the_rule_its_rows_were_measured_with(gpt2, tmp_path,
                                                                                         exclude_first_token):
    """Before exclude_bos (e18b81f), exclude_first_token also left position 0 out of every text's head scores, a GPT-2
    first word too; the reader labelled such a folder exclude_bos: true (position 0 out only when special), so its
    JSON and page claimed today's rule for numbers measured under the old one. The folder, as that version wrote it:
    a manifest without exclude_bos."""
    from reports.html import render_corpus_report

    path = tmp_path / "in.txt"
    path.write_text("the cat sat\n", encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res", exclude_first_token=exclude_first_token)
    assert load_results(tmp_path / "res").to_dict()["settings"]["exclude_bos"] is True  # today's folder
    manifest_path = tmp_path / "res" / "corpus.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["settings"]["exclude_bos"], manifest["settings"]["unk_is_word"]
    manifest_path.write_text(json.dumps(manifest))
    old = load_results(tmp_path / "res")
    # position 0 out of every text's head scores: no value of today's exclude_bos; kept: exclude_bos false
    assert old.to_dict()["settings"]["exclude_bos"] is (None if exclude_first_token else False)
    page = render_corpus_report(old)
    assert ("exclude BOS from the head scores: position 0 of every text" in page) is exclude_first_token
    assert ("exclude BOS from the head scores: no" in page) is not exclude_first_token


@pytest.mark.parametrize("fixture", ["bert", "gpt2"])
def test_an_encoders_folder_from_before_the_score_definition_is_marked_and_not_resumed(request, tmp_path, fixture):
    """An encoder's folder written before 2026-12-07 holds duplicate-token and induction scores of the earlier copies
    alone (today's count every other copy the query sees): read back, its JSON and page say so; resumed, its rows and
    this run's would differ, so the run is refused in one line. A causal model's folder holds the same numbers under
    both definitions: read as today's, and resumed. The folder, as that version wrote it: no score_definition."""
    from reports.html import render_corpus_report

    loaded = request.getfixturevalue(fixture)
    path = tmp_path / "in.txt"
    path.write_text("the cat sat on the cat\n", encoding="utf-8")
    run_local(loaded, iter_records(path), tmp_path / "res", source=str(path))
    today = load_results(tmp_path / "res")
    assert today.to_dict()["settings"]["score_definition"] == "seen_copies"
    assert "id=\"old-scores\"" not in render_corpus_report(today)
    manifest_path = tmp_path / "res" / "corpus.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["settings"]["score_definition"]
    manifest_path.write_text(json.dumps(manifest))
    old = load_results(tmp_path / "res")
    encoder = fixture == "bert"
    assert old.to_dict()["settings"]["score_definition"] == ("earlier_copies" if encoder else "seen_copies")
    assert ("id=\"old-scores\"" in render_corpus_report(old)) is encoder
    path.write_text("the cat sat on the cat\na dog\n", encoding="utf-8")
    if encoder:
        with pytest.raises(HeadscopeError, match="earlier copies of the query's token") as refused:
            run_local(loaded, iter_records(path), tmp_path / "res", source=str(path))
        assert "\n" not in str(refused.value) and "new --results folder" in str(refused.value)
    else:
        assert run_local(loaded, iter_records(path), tmp_path / "res", source=str(path))["new_rows"] == 1


def test_a_results_folder_refuses_another_model_or_settings(gpt2, bert, tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("the cat sat\n", encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res")
    with pytest.raises(HeadscopeError, match="holds results of .*use a new --results folder"):
        run_local(bert, iter_records(path), tmp_path / "res")
    with pytest.raises(HeadscopeError, match="exclude_first_token"):
        run_local(gpt2, iter_records(path), tmp_path / "res", exclude_first_token=False)
    manifest_path = tmp_path / "res" / "corpus.json"  # the same weights read as an encoder (config is_causal false:
    # loading.attention_is_causal) measure other keys and scores; a folder written before that was followed says
    # causal true
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["causal"] = False
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HeadscopeError, match="causal False.*use a new --results folder"):
        run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    del manifest["model"]["causal"]  # a manifest from before it was recorded: resumed, as before
    manifest_path.write_text(json.dumps(manifest))
    assert run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))["new_rows"] == 0
    with pytest.raises(HeadscopeError, match="not a headscope results folder"):
        load_results(tmp_path)
    manifest = json.loads(manifest_path.read_text())  # a folder written before exclude_bos (issue 12)
    del manifest["settings"]["exclude_bos"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HeadscopeError, match="from before exclude_bos .* use a new --results folder"):
        run_local(gpt2, iter_records(path), tmp_path / "res")
    assert len(load_results(tmp_path / "res").texts) == 1  # still readable
    other = tmp_path / "other.txt"  # another input into the same folder: its rows would mix with the first's
    other.write_text("a dog ran\n", encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "named", source=str(path))
    run_local(gpt2, iter_records(path), tmp_path / "named", source=str(path))  # the same input resumes
    with pytest.raises(HeadscopeError, match=r"holds the rows of .*in\.txt, and .*other\.txt differs from them"):
        run_local(gpt2, iter_records(other), tmp_path / "named", source=str(other))
    with pytest.raises(HeadscopeError, match=r"holds the rows of .*in\.txt's column 'text', not of column 'body'"):
        run_local(gpt2, iter_records(path), tmp_path / "named", source=str(path), text_column="body")
    manifest["model"]["n_layers"] += 1  # a manifest edited by hand: the rows no longer fit its sizes
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HeadscopeError, match="rows do not fit its manifest: .* need .* new --results folder"):
        load_results(tmp_path / "res")


def test_a_folder_from_before_unk_was_a_word_is_refused_only_where_that_changes_the_rows(gpt2, bert, tmp_path):
    """55af575 made [UNK] a word of the text (the default query and keys may change) for a tokenizer whose unknown
    token has no other role; a folder written before it resumed silently, old rows and new mixed. Now its manifest
    says so (unk_is_word), and a folder without it is refused for such a model (BERT), still resumed for GPT-2."""
    from analysis.capture import marked_special_ids

    assert bert.tokenizer.unk_token_id not in marked_special_ids(bert.tokenizer)  # the rule changed BERT's marks
    assert gpt2.tokenizer.unk_token_id in marked_special_ids(gpt2.tokenizer)  # and not GPT-2's (its BOS/EOS)
    path = tmp_path / "in.txt"
    path.write_text("the cat sat\n", encoding="utf-8")
    old_texts = tmp_path / "old.txt"
    old_texts.write_text("the cat sat\na dog ran\n", encoding="utf-8")
    for loaded, name in ((bert, "bert"), (gpt2, "gpt2")):
        run_local(loaded, iter_records(path), tmp_path / name, source=str(path))
        manifest_path = tmp_path / name / "corpus.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["settings"]["unk_is_word"] is True
        del manifest["settings"]["unk_is_word"]  # as written before 55af575
        manifest_path.write_text(json.dumps(manifest))
    rows = ResultsFolder(tmp_path / "bert").read_rows()
    with pytest.raises(HeadscopeError, match=r"before .*unknown token counted as a word.* use a new --results folder"):
        run_local(bert, iter_records(old_texts), tmp_path / "bert", source=str(old_texts))
    assert ResultsFolder(tmp_path / "bert").read_rows().equals(rows)  # nothing added to the old rows
    run = run_local(gpt2, iter_records(old_texts), tmp_path / "gpt2", source=str(old_texts))
    assert (run["new_rows"], run["skipped"]) == (1, 1)
    assert json.loads((tmp_path / "gpt2" / "corpus.json").read_text())["settings"]["unk_is_word"] is True
    blank = tmp_path / "blank.txt"  # a BERT folder without an analysed row holds no number of the old rule
    blank.write_text(" ".join(["cat"] * 300) + "\n", encoding="utf-8")
    run_local(bert, iter_records(blank), tmp_path / "refused", source=str(blank))
    manifest_path = tmp_path / "refused" / "corpus.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["settings"]["unk_is_word"]
    manifest_path.write_text(json.dumps(manifest))
    blank.write_text(" ".join(["cat"] * 300) + "\nthe cat sat\n", encoding="utf-8")
    run = run_local(bert, iter_records(blank), tmp_path / "refused", source=str(blank))
    assert (run["new_rows"], run["skipped"]) == (1, 1)
    assert json.loads(manifest_path.read_text())["settings"]["unk_is_word"] is True


def failing(monkeypatch, broken: set[str]):
    """capture_texts as a since-fixed bug had it: every text of `broken` fails (as before 20f4617 a multi-query
    model's every text did); the others as the real one."""
    real = corpus_store.capture_texts

    def buggy(loaded, texts, *args):
        results = list(real(loaded, texts, *args))
        bug = HeadscopeError(UNEXPECTED.format(kind="IndexError", message="simulated bug"))
        return [bug if text in broken else result for text, result in zip(texts, results)]

    monkeypatch.setattr(corpus_store, "capture_texts", buggy)


def test_rows_that_failed_in_the_analysis_are_retried_and_replaced_once_analysed(gpt2, tmp_path, monkeypatch):
    """A folder whose rows failed under a since-fixed bug reran as "0 written, N already there": its error rows were
    never retried. Now a rerun analyses again the texts whose row holds an unexpected error (a bug's): a row that is
    analysed now replaces the old one (one row per text), one that fails again stays as it was; a refusal of the
    text itself (a blank JSONL text, one too long) is not retried. Ground truth: a fresh folder written without the
    bug."""
    texts = short_texts(4, seed=7)
    path = tmp_path / "in.jsonl"
    too_long = " ".join(["cat"] * 300)  # refused by the tiny model (128 positions), on every run
    path.write_text("\n".join(json.dumps({"text": t}) for t in [*texts, " ", too_long]) + "\n", encoding="utf-8")
    with monkeypatch.context() as patch:
        failing(patch, {texts[1], texts[2]})
        run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    folder = ResultsFolder(tmp_path / "res")
    assert folder.read_rows()["error"].to_pylist()[1:3] == ["unexpected IndexError: simulated bug"] * 2
    with monkeypatch.context() as patch:  # the bug fixed for one text, not the other
        failing(patch, {texts[2]})
        run = run_local(gpt2, iter_records(path), folder, source=str(path))
    assert (run["new_rows"], run["skipped"], run["retried"], run["recovered"]) == (1, 5, 2, 1)
    assert folder.read_rows()["error"].to_pylist()[1:3] == [None, "unexpected IndexError: simulated bug"]
    run = run_local(gpt2, iter_records(path), folder, source=str(path))
    assert (run["new_rows"], run["skipped"], run["retried"], run["recovered"]) == (1, 5, 1, 1)
    run_local(gpt2, iter_records(path), tmp_path / "fresh", source=str(path))
    assert folder.read_rows().equals(ResultsFolder(tmp_path / "fresh").read_rows())
    assert sum(pq.read_metadata(part).num_rows for part in folder.part_files()) == 6  # one row per text
    assert json.loads(folder.manifest_path.read_text())["counts"] == {"rows": 6, "analysed": 4, "failed": 2}
    run = run_local(gpt2, iter_records(path), folder, source=str(path))
    assert (run["new_rows"], run["skipped"], run["retried"]) == (0, 6, 0)  # the blank and the long are not retried


def test_a_retry_killed_before_its_clean_up_leaves_one_row_per_text_after_the_next_run(gpt2, tmp_path, monkeypatch):
    """A run killed after writing a retried text's new row and before removing its old error row (drop_replaced) left
    both in the part files for good: the next runs counted the text as done. Now the next run removes the old row
    first. Ground truth: a fresh folder of the same input."""
    texts = short_texts(3, seed=5)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    with monkeypatch.context() as patch:
        failing(patch, {texts[1]})
        run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    folder = ResultsFolder(tmp_path / "res")
    real = ResultsFolder.drop_replaced

    def killed(self, replaced, parts):
        if replaced:  # the end of the retrying run: the process dies here
            raise KeyboardInterrupt
        return real(self, replaced, parts)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(ResultsFolder, "drop_replaced", killed)
        run_local(gpt2, iter_records(path), folder, source=str(path))
    raw = sum(pq.read_metadata(part).num_rows for part in folder.part_files())
    assert raw == 4 and folder.superseded_errors() == {(2, folder.read_rows()["text_hash"].to_pylist()[1])}
    run = run_local(gpt2, iter_records(path), folder, source=str(path))
    assert (run["new_rows"], run["skipped"], run["retried"]) == (0, 3, 0)
    assert sum(pq.read_metadata(part).num_rows for part in folder.part_files()) == 3  # one row per text
    run_local(gpt2, iter_records(path), tmp_path / "fresh", source=str(path))
    assert folder.read_rows().equals(ResultsFolder(tmp_path / "fresh").read_rows())


def test_an_input_made_shorter_is_refused_then_its_rows_past_the_end_are_dropped(gpt2, tmp_path, counted):
    """Edited in place and made shorter: the rows of the lines it no longer has were kept and averaged in. Now the
    rerun refuses (nothing written) until told the input changed; then those rows go and every other row stays."""
    texts = short_texts(6, seed=4)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), flush_rows=4)
    before = load_results(tmp_path / "res")
    path.write_text("\n".join(texts[:4]) + "\n", encoding="utf-8")  # lines 5 and 6 deleted
    counted.clear()
    with pytest.raises(HeadscopeError, match=r"res holds 2 rows of texts .*in\.txt no longer has \(numbers 5, 6\)"
                                             r".*--input-changed.*new --results folder"):
        run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    assert counted == [] and load_results(tmp_path / "res").means.keys() == before.means.keys()
    assert len(load_results(tmp_path / "res").texts) == 6  # refused: the folder is still the old file's results
    run = run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), input_changed=True)
    assert counted == [] and (run["new_rows"], run["skipped"], run["dropped"]) == (0, 4, 2)
    fresh = tmp_path / "fresh"  # ground truth: the shortened file into a new folder
    run_local(gpt2, iter_records(path), fresh, source=str(path))
    assert ResultsFolder(tmp_path / "res").read_rows().equals(ResultsFolder(fresh).read_rows())
    got, want = load_results(tmp_path / "res"), load_results(fresh)
    assert [t.number for t in got.texts] == [1, 2, 3, 4]
    for name in want.means:
        np.testing.assert_array_equal(got.means[name], want.means[name])
    assert json.loads((tmp_path / "res" / "corpus.json").read_text())["counts"]["rows"] == 4


def test_an_input_is_compared_by_its_texts_not_by_its_path(gpt2, tmp_path, counted):
    """A moved or copied input resumes wherever it now is; another corpus is refused wherever it is, also at the
    path the folder recorded (the recorded file replaced) and after the recorded file is gone."""
    texts = short_texts(5, seed=5)
    first = tmp_path / "a" / "in.txt"
    first.parent.mkdir()
    first.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run_local(gpt2, iter_records(first), tmp_path / "res", source=str(first))
    rows = ResultsFolder(tmp_path / "res").read_rows()
    copy = tmp_path / "b" / "in.txt"  # a copy elsewhere, the recorded file still there: once refused
    copy.parent.mkdir()
    copy.write_text("\n".join([*texts, "a line added"]) + "\n", encoding="utf-8")
    counted.clear()
    run = run_local(gpt2, iter_records(copy), tmp_path / "res", source=str(copy))
    assert counted == ["a line added"] and (run["new_rows"], run["skipped"]) == (1, 5)
    assert json.loads((tmp_path / "res" / "corpus.json").read_text())["source"] == str(copy.resolve())
    rows = ResultsFolder(tmp_path / "res").read_rows()
    other = short_texts(6, seed=6)
    copy.write_text("\n".join(other) + "\n", encoding="utf-8")  # the recorded path now holds another corpus
    with pytest.raises(HeadscopeError, match=r"res holds the rows of .*b/in\.txt, and .*b/in\.txt differs from "
                                             r"them: 6 of its texts are not the rows' \(numbers 1, 2, 3 and 3 more\)"
                                             r".*--input-changed"):
        run_local(gpt2, iter_records(copy), tmp_path / "res", source=str(copy))
    copy.unlink()
    first.unlink()
    elsewhere = tmp_path / "c.txt"  # the recorded file gone, another one given: once taken as the same
    elsewhere.write_text("\n".join(other[:3]) + "\n", encoding="utf-8")
    with pytest.raises(HeadscopeError, match=r"3 of its texts are not the rows' .*3 rows of texts it no longer has"):
        run_local(gpt2, iter_records(elsewhere), tmp_path / "res", source=str(elsewhere))
    assert counted == ["a line added"] and ResultsFolder(tmp_path / "res").read_rows().equals(rows)


def test_another_file_at_the_recorded_path_is_not_the_recorded_file_edited(gpt2, tmp_path, counted):
    """The recorded input moved away (kept as v1.txt) and another corpus put at its path with the same first line was
    taken as the file edited in place: its other rows were dropped without --input-changed, and v1.txt could no
    longer resume. Now only the recorded file itself (the same device and inode) edited in place is; another file at
    that path, a file saved anew included, is refused (the folder untouched) until --input-changed."""
    path, kept = tmp_path / "in.txt", tmp_path / "v1.txt"
    texts = short_texts(3, seed=8)
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    rows = ResultsFolder(tmp_path / "res").read_rows()
    path.rename(kept)
    path.write_text("\n".join([texts[0], "something else", "another corpus"]) + "\n", encoding="utf-8")
    counted.clear()
    with pytest.raises(HeadscopeError, match=r"2 of its texts are not the rows' \(numbers 2, 3\); it is not the file "
                                             r"recorded at that path .*--input-changed"):
        run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path))
    assert counted == [] and ResultsFolder(tmp_path / "res").read_rows().equals(rows)
    run = run_local(gpt2, iter_records(kept), tmp_path / "res", source=str(kept))  # the real input resumes
    assert counted == [] and (run["new_rows"], run["skipped"], run["dropped"]) == (0, 3, 0)
    kept.write_text("\n".join([texts[0], texts[1], "a third line edited"]) + "\n", encoding="utf-8")  # in place
    run = run_local(gpt2, iter_records(kept), tmp_path / "res", source=str(kept))
    assert counted == ["a third line edited"] and (run["new_rows"], run["skipped"], run["dropped"]) == (1, 2, 1)
    anew = tmp_path / "v1.txt.tmp"  # saved as a new file renamed over the old one (sed -i, many editors)
    anew.write_text("\n".join([texts[0], "a second line edited", "a third line edited"]) + "\n", encoding="utf-8")
    anew.replace(kept)
    with pytest.raises(HeadscopeError, match=r"1 of its texts are not the rows' \(number 2\); it is not the file"):
        run_local(gpt2, iter_records(kept), tmp_path / "res", source=str(kept))
    manifest_path = tmp_path / "res" / "corpus.json"  # a folder from before the identity was recorded
    manifest = json.loads(manifest_path.read_text())
    del manifest["source_identity"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HeadscopeError, match=r"\(number 2\); the folder does not record which file"):
        run_local(gpt2, iter_records(kept), tmp_path / "res", source=str(kept))
    run = run_local(gpt2, iter_records(kept), tmp_path / "res", source=str(kept), input_changed=True)
    assert counted[-1] == "a second line edited" and (run["new_rows"], run["skipped"], run["dropped"]) == (1, 2, 1)
    run_local(gpt2, iter_records(kept), tmp_path / "fresh", source=str(kept))  # ground truth: the file afresh
    assert ResultsFolder(tmp_path / "res").read_rows().equals(ResultsFolder(tmp_path / "fresh").read_rows())
    edited = kept.read_text(encoding="utf-8").replace("a third line edited", "a third line again")
    kept.write_text(edited, encoding="utf-8")  # the identity recorded again: an edit in place is accepted again
    run = run_local(gpt2, iter_records(kept), tmp_path / "res", source=str(kept))
    assert counted[-1] == "a third line again" and (run["new_rows"], run["dropped"]) == (1, 1)


def test_dropped_counts_the_texts_dropped_not_the_superseded_rows_removed(gpt2, tmp_path):
    """Code before rewrite_rows left a changed text's old row in its part (read_rows keeps the newest). Removing
    those rows counted them as dropped: an id renamed said "1 dropped". Now `dropped` is the number of texts whose
    row went, the one read_rows showed against the input (ground truth: the latest rows before against the file)."""
    from analysis.corpus_store import InputChange

    path = tmp_path / "in.jsonl"
    records = [{"id": "a", "text": "the cat sat"}, {"id": "b", "text": "a dog ran far"}, {"id": "c", "text": "rain"}]

    def write(stale: bool = False) -> dict:
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        before, _ = ResultsFolder(tmp_path / "res").latest_rows() if (tmp_path / "res").exists() else ({}, {})
        now = {int(r["number"]): r["text_hash"] for r in iter_records(path)}
        expected = sum(before[n] != now.get(n) for n in before)  # texts whose row no longer fits the input
        checked = InputChange(0, [], [], 0, {}) if stale else None  # as older code: nothing dropped, rows added
        return {**run_local(gpt2, iter_records(path), tmp_path / "res", source=str(path), checked=checked),
                "expected": expected}

    def raw_rows() -> int:
        return sum(pq.read_metadata(part).num_rows for part in ResultsFolder(tmp_path / "res").part_files())

    write()
    records[1]["text"] = "a dog ran home"
    write(stale=True)
    assert raw_rows() == 4  # the superseded row of b, as older code left it
    records[0]["id"] = "A"  # only an id renamed: nothing dropped, the superseded row cleaned away
    run = write()
    assert (run["dropped"], run["expected"], run["relabelled"], raw_rows()) == (0, 0, 1, 3)
    records[1]["text"] = "a dog sat"
    write(stale=True)
    records[1]["text"], records[2]["text"] = "a dog sat down", "rain again"  # two texts replaced, three rows removed
    run = write()
    assert (run["dropped"], run["expected"], run["new_rows"], raw_rows()) == (2, 2, 2, 3)
    write_fresh = run_local(gpt2, iter_records(path), tmp_path / "fresh", source=str(path))
    assert write_fresh["new_rows"] == 3
    assert ResultsFolder(tmp_path / "res").read_rows().equals(ResultsFolder(tmp_path / "fresh").read_rows())


@pytest.fixture(scope="module")
def bert(bert_path):
    from analysis import load_model

    return load_model(str(bert_path))


@pytest.fixture(scope="module")
def left_llama(tmp_path_factory):
    """A tiny Llama padded on the left: position ids must count from each text's first token."""
    from analysis import load_model
    from tests.checkpoints import tiny_llama

    loaded = load_model(str(tiny_llama(tmp_path_factory.mktemp("tiny-llama-corpus"))))
    loaded.tokenizer.padding_side = "left"
    return loaded


def varied_records(n: int) -> list[dict]:
    """Texts of 1 to 30 words (2 to about 60 tokens): several padded widths, several lengths within each. The
    shortest matter: on the CPU, padding a text of fewer than 8 tokens past 8 changes its sums' rounding."""
    from analysis.corpus_io import make_record

    rng = np.random.default_rng(3)
    words = test_corpus.WORDS
    texts = ["cat", "the dog", "a mat", *(" ".join(rng.choice(words, int(rng.integers(1, 31)))) for _ in range(n))]
    return [make_record(i + 1, text) for i, text in enumerate(texts[:n])]


@pytest.mark.parametrize("fixture", ["gpt2", "bert", "left_llama"])
def test_a_texts_row_does_not_depend_on_the_batch_it_lands_in(request, fixture, monkeypatch):
    """Local and Ray cut a corpus into batches differently; a text's numbers must not change with its batch, or a
    rank statistic (the Mann-Whitney rank-biserial) could flip on two dot products equal to float rounding: one
    flipped pair moves r by 2 / (n1 n2), far more than 1e-6 on these models. So the same records run in three
    compositions (in order, 4 per pass; reversed among more records, 7 per pass; each text alone) give the same
    rows bit for bit, and each row equals its text's own unpadded pass to float rounding. Padding a text to the
    longest of its batch instead (as analyze_batch does) fails the bit-for-bit comparison: a text of under ~16
    tokens alone and in a batch of longer texts rounds differently, and BERT's attention mask is dropped when no
    row of a pass has padding."""
    from analysis import capture, corpus
    from analysis.corpus import compute_text_values

    loaded = request.getfixturevalue(fixture)
    records = varied_records(24)
    passes, real = [], corpus.run_pass

    def spy(loaded, items, *args, **kwargs):
        passes.append(tuple(sorted((int(item.ids.size), item.text) for item in items)))
        return real(loaded, items, *args, **kwargs)

    monkeypatch.setattr(corpus, "run_pass", spy)
    first = corpus_store.analyze_records(loaded, records, batch_size=4)
    first_passes, passes[:] = list(passes), []
    second = corpus_store.analyze_records(loaded, [*records[::-1], *varied_records(40)[24:]], batch_size=7)
    mates = [{text: group for group in run for _, text in group} for run in (first_passes, passes)]
    moved = [text for text in mates[0] if mates[0][text] != mates[1][text]]
    assert len(moved) > len(records) / 2  # most texts shared their pass with other texts in the second run
    assert any(len({size for size, _ in group}) > 1 for group in first_passes)  # texts of different lengths padded
    assert len({size for group in first_passes for size, _ in group}) > 10
    alone = [row for record in records for row in corpus_store.analyze_records(loaded, [record], batch_size=1)]
    assert all(row["error"] is None for row in first)
    for label, rows in (("reversed, 7 per pass", second), ("each text alone", alone)):
        by_number = {row["number"]: row for row in rows}
        for row in first:
            other = by_number[row["number"]]
            assert (other["text_hash"], other["n_tokens"]) == (row["text_hash"], row["n_tokens"])
            for name in CORPUS_MEASURES + LAYER_MEASURES:  # bit for bit (NaN where undefined), stronger than 1e-6
                np.testing.assert_array_equal(np.array(other[name]), np.array(row[name]),
                                              err_msg=f"{label}: row {row['number']} {name}")
    model = loaded.info.to_dict()
    for row, record in zip(first, records):  # against each text alone, unpadded: the same numbers to rounding
        heads, layers = compute_text_values(capture(loaded, record["text"], pattern_layers=[]), model)
        for name in CORPUS_MEASURES:
            np.testing.assert_allclose(np.array(row[name]), heads[name].ravel(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"row {row['number']} {name}")
        alone = analyze(loaded, record["text"], layers=None)  # its dot products: which pairs rounding can flip
        for layer, data in alone.layers.items():
            for name, dps in (("rank_biserial", (data.same_head_dp, data.diff_head_dp)),
                              ("rank_biserial_centered", (data.dp_stats.same_head_dp_centered,
                                                          data.dp_stats.diff_head_dp_centered))):
                want = getattr(data.dp_stats, name)
                assert layers[name][layer] == pytest.approx(np.nan if want is None else want, abs=1e-12, nan_ok=True)
                assert_rank_statistics_close((None, row[name][layer]), (None, layers[name][layer]), *dps,
                                             where=f"row {row['number']} {name} layer {layer}")


def test_a_text_that_fails_in_a_batch_costs_only_its_own_row(gpt2, monkeypatch):
    """An unexpected error in a pass splits the batch until the text at fault is alone: it gets the error, every
    other text its normal row."""
    from analysis import corpus

    records = varied_records(9)
    clean = corpus_store.analyze_records(gpt2, records, batch_size=16)
    bad = records[4]["text"]
    real, passes = corpus.run_pass, []

    def flaky(loaded, items, *args, **kwargs):
        passes.append(len(items))
        if any(item.text == bad for item in items):
            raise RuntimeError("a kernel failed")
        return real(loaded, items, *args, **kwargs)

    monkeypatch.setattr(corpus, "run_pass", flaky)
    rows = corpus_store.analyze_records(gpt2, records, batch_size=16)
    assert [row["error"] for row in rows] == [None] * 4 + ["unexpected RuntimeError: a kernel failed"] + [None] * 4
    assert 1 in passes and max(passes) > 1  # the bad text's pass was split down to it alone
    for row, want in zip(rows, clean):
        if row["error"] is None:
            assert row.keys() == want.keys()
            for name, value in want.items():  # NaN where undefined: compared as arrays
                np.testing.assert_array_equal(np.array(row[name]), np.array(value), err_msg=name)


def test_a_text_as_long_as_the_model_accepts_is_not_padded_past_its_positions(gpt2):
    """Padding goes to the next multiple of 8 above a text's length (at least 16), never past the model's positions
    (128 for the tiny GPT-2): a text of 120 to 128 tokens runs at 128, and gives its single pass's numbers."""
    from analysis.capture import text_input
    from analysis.corpus import padded_width

    assert [padded_width(n, 128) for n in (1, 7, 8, 15, 16, 111, 112, 128)] == [16, 16, 16, 16, 24, 112, 120, 128]
    def n_tokens(text):
        return len(gpt2.tokenizer(text)["input_ids"])

    text = next(t for t in (" ".join(["cat"] * i + ["a"] * j) for i in range(130) for j in range(4))
                if n_tokens(t) == 128)  # as long as the model accepts: unclamped, its width would be 136
    shorter = text.rsplit(" ", 3)[0]
    assert 120 <= text_input(gpt2, shorter).ids.size < text_input(gpt2, text).ids.size == 128
    records = [{"number": i + 1, "id": str(i + 1), "text": t, "text_hash": str(i), "error": None}
               for i, t in enumerate([text, shorter])]
    rows = corpus_store.analyze_records(gpt2, records, batch_size=2)
    assert [row["error"] for row in rows] == [None, None]
    alone = corpus_store.analyze_records(gpt2, records[1:], batch_size=1)
    for name in CORPUS_MEASURES:
        np.testing.assert_array_equal(rows[1][name], alone[0][name])
