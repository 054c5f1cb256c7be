"""Corpus results as Parquet (local engine): rows equal the in-memory corpus, aggregates too, and reruns resume."""

import json

import numpy as np
import pytest

from analysis import HeadscopeError, corpus_store
from analysis.corpus import CORPUS_MEASURES, LAYER_MEASURES, analyze_corpus
from analysis.corpus_io import iter_records
from analysis.corpus_store import ROW_SCHEMA, ResultsFolder, load_results, run_local
from tests.analysis import test_corpus
from tests.analysis.test_corpus import short_texts

one_thread = test_corpus.one_thread  # autouse: the tiny model runs fastest on one thread


@pytest.fixture
def counted(monkeypatch):
    """Every text the engine runs the model on."""
    seen = []
    real = corpus_store.capture

    def spy(loaded, text, pattern_layers=None):
        seen.append(text)
        return real(loaded, text, pattern_layers)

    monkeypatch.setattr(corpus_store, "capture", spy)
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
    run = run_local(gpt2, iter_records(path), tmp_path / "res", batch_size=4, flush_rows=8)
    assert run["skipped"] == 8 and run["new_rows"] == 13 and len(counted) == 13  # nothing computed twice
    whole = tmp_path / "whole"
    run_local(gpt2, iter_records(path), whole, batch_size=4)
    resumed, reference = folder.read_rows(), ResultsFolder(whole).read_rows()
    assert resumed.num_rows == 21 and resumed.equals(reference)  # nothing lost, identical rows
    counted.clear()
    again = run_local(gpt2, iter_records(path), tmp_path / "res")
    assert again["new_rows"] == 0 and again["skipped"] == 21 and counted == []
    assert [r["engine"] for r in json.loads((tmp_path / "res" / "corpus.json").read_text())["runs"]] == ["local"] * 2


def test_a_changed_text_is_analysed_again_and_a_broken_part_is_set_aside(gpt2, tmp_path, counted):
    texts = short_texts(6, seed=2)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res", flush_rows=3)
    path.write_text("\n".join(texts[:5] + ["an edited last line"]), encoding="utf-8")
    (tmp_path / "res" / "rows" / "cut-short.parquet").write_bytes(b"PAR1 not really")  # a write killed part-way
    counted.clear()
    run = run_local(gpt2, iter_records(path), tmp_path / "res")
    assert counted == ["an edited last line"] and run["skipped"] == 5
    assert (tmp_path / "res" / "rows" / "cut-short.parquet.broken").exists()
    result = load_results(tmp_path / "res")  # line 6's new row replaces its old one
    assert [(t.number, t.excerpt) for t in result.texts] == [*[(i + 1, t) for i, t in enumerate(texts[:5])],
                                                             (6, "an edited last line")]
    assert result.n_analysed == 6


def test_a_results_folder_refuses_another_model_or_settings(gpt2, bert, tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("the cat sat\n", encoding="utf-8")
    run_local(gpt2, iter_records(path), tmp_path / "res")
    with pytest.raises(HeadscopeError, match="holds results of .*use a new --results folder"):
        run_local(bert, iter_records(path), tmp_path / "res")
    with pytest.raises(HeadscopeError, match="exclude_first_token"):
        run_local(gpt2, iter_records(path), tmp_path / "res", exclude_first_token=False)
    with pytest.raises(HeadscopeError, match="not a headscope results folder"):
        load_results(tmp_path)
    manifest_path = tmp_path / "res" / "corpus.json"  # a folder written before exclude_bos (issue 12)
    manifest = json.loads(manifest_path.read_text())
    del manifest["settings"]["exclude_bos"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HeadscopeError, match="from before exclude_bos .* use a new --results folder"):
        run_local(gpt2, iter_records(path), tmp_path / "res")
    assert len(load_results(tmp_path / "res").texts) == 1  # still readable


@pytest.fixture(scope="module")
def bert(bert_path):
    from analysis import load_model

    return load_model(str(bert_path))
