"""Corpus readers: every input kind gives the same records, numbered as the input is, with bad records kept."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import HeadscopeError, corpus_io
from analysis.corpus_io import check_input, detect_kind, iter_records, text_hash

NOT_JSON = "cannot be read as JSON (Expecting value at column 1)"  # json's own words for a line that is not JSON

TEXTS = ["the cat sat on the mat", "a dog ran far from home", "rain in the home", "the mat and the cat"]


def good(records):
    return [(r["number"], r["id"], r["text"]) for r in records if r["error"] is None]


def bad(records):
    return [(r["number"], r["id"], r["error"]) for r in records if r["error"] is not None]


def test_txt_keeps_line_numbers_counting_blank_lines_and_records_bad_bytes(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xef\xbb\xbfone\n\n  \ntwo\r\nbad \xff byte\nthree\n")  # a byte order mark first
    records = list(iter_records(path))
    assert good(records) == [(1, "1", "one"), (4, "4", "two"), (6, "6", "three")]  # lines 2, 3 blank: no record
    assert bad(records) == [(5, "5", "not UTF-8 (bad byte at offset 4)")]
    assert records[0]["text_hash"] == text_hash("one") and records[1]["text_hash"] == text_hash("two")
    assert list(corpus_io.parse_lines(path.read_bytes(), "txt")) == records  # Ray's path: the file's bytes at once


def test_jsonl_ids_and_every_kind_of_bad_line(tmp_path):
    lines = [json.dumps({"text": "first", "id": "doc-a"}), json.dumps({"text": "second"}), "",
             json.dumps({"title": "no text"}), "not json", json.dumps({"text": ""}), json.dumps({"text": 5}),
             json.dumps(["a list"]), json.dumps({"text": "lone \ud800 surrogate", "id": 9})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = list(iter_records(path))
    assert good(records) == [(1, "doc-a", "first"), (2, "2", "second")]
    assert bad(records) == [(4, "4", 'missing "text" field'), (5, "5", NOT_JSON), (6, "6", "empty text"),
                            (7, "7", '"text" is not a string'), (8, "8", "not a JSON object"),
                            (9, "9", "not UTF-8 (bad byte at offset 5)")]
    assert len({r["text_hash"] for r in records}) == len(records)  # bad records get hashes of what was there


def test_too_long_is_a_bad_record(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_io, "MAX_CHARS", 10)
    path = tmp_path / "in.txt"
    path.write_text("short\n" + "x" * 11 + "\n", encoding="utf-8")
    assert bad(list(iter_records(path))) == [(2, "2", "too long (11 characters; at most 10)")]


def test_parquet_file_and_folder_number_rows_in_file_name_order(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": TEXTS[2:] + [None]}), folder / "b.parquet")
    pq.write_table(pa.table({"text": TEXTS[:2], "other": [1, 2]}), folder / "a.parquet")
    assert detect_kind(folder) == "parquet" and detect_kind(folder / "a.parquet") == "parquet"
    records = list(iter_records(folder, batch_rows=1))
    assert good(records) == [(i + 1, str(i + 1), t) for i, t in enumerate(TEXTS)]
    assert bad(records) == [(5, "5", 'missing "text" field')]
    assert good(iter_records(folder / "b.parquet")) == [(1, "1", TEXTS[2]), (2, "2", TEXTS[3])]


def test_parquet_id_column_and_text_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": TEXTS[:2], "id": [10, 20]}), path)
    assert good(iter_records(path, "body")) == [(1, "10", TEXTS[0]), (2, "20", TEXTS[1])]
    with pytest.raises(HeadscopeError, match="has no column 'text' .*--text-column"):
        list(iter_records(path))


def test_saved_dataset_with_text_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": TEXTS + [""], "label": [0, 1, 0, 1, 0]}).save_to_disk(tmp_path / "ds")
    assert detect_kind(tmp_path / "ds") == "hf"
    records = list(iter_records(tmp_path / "ds", "content"))
    assert good(records) == [(i + 1, str(i + 1), t) for i, t in enumerate(TEXTS)]
    assert bad(records) == [(5, "5", "empty text")]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS}),
                          "test": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(tmp_path / "dd")
    with pytest.raises(HeadscopeError, match="several splits .*dd/train"):
        list(iter_records(tmp_path / "dd"))


def test_missing_input_and_empty_folder_are_one_clear_error(tmp_path):
    with pytest.raises(HeadscopeError, match="does not exist"):
        detect_kind(tmp_path / "nope.txt")
    with pytest.raises(HeadscopeError, match="holds no .parquet files"):
        detect_kind(tmp_path)


def test_the_extension_decides_txt_or_jsonl_whatever_the_first_line_looks_like(tmp_path):
    """A .txt whose first line starts with "{" is still one text per line; a .jsonl is JSON lines. Every reader:
    the results engines' (iter_records, parse_lines) and the one of --batch --out-dir and the app's upload
    (corpus.parse_texts, which is given the file's name)."""
    from analysis.corpus import parse_texts

    data = b'{"text": "looks like JSON"}\nplain words\n'
    for name in ("notes.txt", "NOTES.TXT"):
        path = tmp_path / name
        path.write_bytes(data)
        assert detect_kind(path) == "txt"
        assert good(iter_records(path)) == [(1, "1", '{"text": "looks like JSON"}'), (2, "2", "plain words")]
        assert parse_texts(data, str(path)) == ['{"text": "looks like JSON"}', "plain words"]
    path = tmp_path / "notes.jsonl"
    path.write_bytes(data)
    assert good(iter_records(path)) == [(1, "1", "looks like JSON")]
    assert bad(iter_records(path)) == [(2, "2", NOT_JSON)]
    parsed = parse_texts(data, path.name)
    assert parsed[0] == "looks like JSON" and str(parsed[1]) == f"line 2 {NOT_JSON}."
    assert parse_texts(b"plain first\n" + data, "notes.jsonl")[0].args[0] == f"line 1 {NOT_JSON}."
    assert parse_texts(data, "notes.txt", kind="jsonl")[0] == "looks like JSON"  # an explicit kind wins
    assert parse_texts(data)[0] == "looks like JSON"  # no file name: the first line still decides


def test_a_table_a_damaged_parquet_and_a_column_of_plain_text_are_refused_before_reading(tmp_path):
    """A CSV would be read as lines (its header and commas becoming texts), a truncated Parquet file gave pyarrow's
    traceback after the results folder was made, and a text column named for a .txt was ignored: each is one clear
    error now, from check_input before anything is written, and from every reader."""
    from analysis.corpus import parse_texts

    table = tmp_path / "t.csv"
    table.write_text("id,body\n1,a text\n")
    for read in (check_input, detect_kind, lambda path: list(iter_records(path)),
                 lambda path: parse_texts(path.read_bytes(), str(path))):
        with pytest.raises(HeadscopeError, match=r"t\.csv is a CSV table, which is not read as a corpus"):
            read(table)
    good_file = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), good_file)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good_file.read_bytes()[:40])
    (tmp_path / "empty.parquet").write_bytes(b"")
    for path in (broken, tmp_path / "empty.parquet"):
        with pytest.raises(HeadscopeError, match=r"is not readable Parquet \(.*\): is the file complete\?"):
            check_input(path)
        with pytest.raises(HeadscopeError, match="is not readable Parquet"):
            list(iter_records(path))
    with pytest.raises(HeadscopeError, match="has no column 'body'"):
        check_input(good_file, "body")
    lines = tmp_path / "plain.txt"
    lines.write_text("one\ntwo\n")
    with pytest.raises(HeadscopeError, match=r"plain\.txt is plain text, one text per line, with no column 'body'"):
        check_input(lines, "body")
    with pytest.raises(HeadscopeError, match="with no column 'body'"):
        list(iter_records(lines, "body"))


def test_parse_texts_names_a_bad_line_as_the_file_numbers_it():
    """Blank lines count, as in iter_records: the error names the line an editor shows."""
    from analysis.corpus import parse_texts

    texts = parse_texts(b'{"text": "a"}\n\n\n{"text": "b"}\n[1]\n', "t.jsonl")
    assert texts[:2] == ["a", "b"] and "line 5 " in str(texts[2])


@pytest.mark.parametrize("name", ["t.txt", "t.jsonl"])
def test_a_byte_order_mark_is_no_part_of_the_first_text_in_either_reader(tmp_path, name):
    """Notepad's "UTF-8" starts the file with a BOM: the results engines' reader (iter_records) drops it, so the
    reader of --batch --out-dir and the app's upload (corpus.parse_texts) must read the same texts, not a first
    JSON line that is "not a JSON object" or a first text that starts with U+FEFF."""
    from analysis.corpus import parse_texts

    path = tmp_path / name
    lines = TEXTS[:2] if name.endswith(".txt") else [json.dumps({"text": text}) for text in TEXTS[:2]]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    assert parse_texts(path.read_bytes(), name) == [r["text"] for r in iter_records(path)] == TEXTS[:2]
    assert parse_texts(path.read_bytes().decode("utf-8"), name) == TEXTS[:2]
