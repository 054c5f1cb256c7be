"""Corpus inputs as records: .txt, .jsonl, Parquet (file or folder), a Hugging Face dataset saved to disk.

Every input becomes a stream of records {number, id, text, text_hash, error}:
  number     1-based position: the line number for .txt/.jsonl (blank lines counted, so it is the line an editor
             shows), the row number over the dataset for Parquet and Hugging Face datasets (files in name order);
  id         the record's own "id" (a JSONL field or an `id` column) when it has one, else str(number);
  text       the text, or None when the record is bad;
  text_hash  sha256 of the text's UTF-8 bytes (of the raw record when it is bad): with `number` it says whether a
             result row is this record's (analysis.corpus_store resumes on it);
  error      why a bad record was not analysed (empty, too long, not UTF-8, missing field), else None.
Blank lines of a .txt/.jsonl file are not records. A bad record never stops the reading; it is kept with its reason.

The parsers are plain functions of bytes or values, shared by the local engine (which reads the file here) and the
Ray engine (whose readers hand the same bytes or rows to them), so both engines see the same records.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from analysis.errors import HeadscopeError

MAX_CHARS = 1_000_000  # longer than any supported model's context in any tokenizer; refused before tokenizing
KINDS = ("txt", "jsonl", "parquet", "hf")
FIELDS = ("number", "id", "text", "text_hash", "error")
EMPTY = "empty text"
TOO_LONG = "too long ({n:,} characters; at most {limit:,})"
NOT_UTF8 = "not UTF-8 (bad byte at offset {offset})"
NOT_JSON = "not a JSON object"
BAD_JSON = "cannot be read as JSON ({why})"
LONG_NUMBER = "a number of more digits than Python reads"  # past Python's int digit limit
MISSING = 'missing "{field}" field'
NOT_STRING = '"{field}" is not a string'
NO_INPUT = ("{path} does not exist: give a .txt, .jsonl or Parquet file, or a folder of Parquet files or a saved "
            "dataset.")
NO_COLUMN = "{path} has no column {column!r} (columns: {columns}): name the text column with --text-column."
SPLITS = ("{path} holds several splits ({splits}): point at one of them, e.g. {path}/{first}.")
NO_PARQUET = "{path} holds no .parquet files and no saved dataset."
TABLE_SUFFIXES = (".csv", ".tsv")  # read as text lines, a table's header, quotes and separators would become texts
NOT_A_TABLE = ("{path} is a {suffix} table, which is not read as a corpus (its header, quotes and separators would "
               "become texts): save it as Parquet or JSONL (then --text-column names its text), or one text per line "
               "as .txt.")
NO_COLUMNS = "{path} is plain text, one text per line, with no column {column!r}: drop --text-column."
BAD_PARQUET = "{path} is not readable Parquet ({reason}): is the file complete?"


def check_not_a_table(path) -> None:
    """Refuse a CSV/TSV file by its name (NOT_A_TABLE): both corpus readers would take its lines as texts."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in TABLE_SUFFIXES:
        raise HeadscopeError(NOT_A_TABLE.format(path=path, suffix=suffix[1:].upper()))


def text_hash(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def make_record(number: int, value, id_value=None, field: str = "text", raw: bytes | None = None) -> dict:
    """One record from a field's value: a str is checked (empty, too long), anything else is a bad record."""
    record_id = str(number) if id_value is None else str(id_value)
    text, error = None, None
    if value is None:
        error = MISSING.format(field=field)
    elif isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            error = NOT_UTF8.format(offset=exc.start)
    elif not isinstance(value, str):
        error = NOT_STRING.format(field=field)
    if error is None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\\ud800" escape
            error = NOT_UTF8.format(offset=exc.start)
    if error is None:
        if not value.strip():
            error = EMPTY
        elif len(value) > MAX_CHARS:
            error = TOO_LONG.format(n=len(value), limit=MAX_CHARS)
        else:
            text = value
    digest = text_hash(text) if text is not None else text_hash(raw if raw is not None else repr(value).encode())
    return {"number": number, "id": record_id, "text": text, "text_hash": digest, "error": error}


def json_problem(exc: json.JSONDecodeError) -> str:
    """What json says is wrong with a line, and where: "Expecting value at column 1", "Unterminated string starting
    at column 10" (its messages that end in "at" name the place themselves)."""
    return f"{exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"


def bad_record(number: int, raw: bytes, error: str) -> dict:
    return {"number": number, "id": str(number), "text": None, "text_hash": text_hash(raw), "error": error}


def parse_line(number: int, line: bytes, kind: str, field: str = "text") -> dict | None:
    """One line of a .txt or .jsonl file (without its newline) -> a record, or None for a blank line."""
    if not line.strip():
        return None
    if kind == "txt":
        return make_record(number, line.rstrip(b"\r"), raw=line)
    try:
        item = json.loads(line)
    except UnicodeDecodeError as exc:
        return bad_record(number, line, NOT_UTF8.format(offset=exc.start))
    except json.JSONDecodeError as exc:  # what json says is wrong, and where on the line
        return bad_record(number, line, BAD_JSON.format(why=json_problem(exc)))
    except ValueError:  # an integer past Python's digit limit
        return bad_record(number, line, BAD_JSON.format(why=LONG_NUMBER))
    except RecursionError:  # JSON nested past the recursion limit
        item = None
    if not isinstance(item, dict):
        return bad_record(number, line, NOT_JSON)
    id_value = item.get("id")
    if isinstance(id_value, (dict, list)):
        id_value = json.dumps(id_value, sort_keys=True)
    return make_record(number, item.get(field), id_value, field, raw=line)


def parse_lines(data: bytes | Iterable[bytes], kind: str, field: str = "text") -> Iterator[dict]:
    """Records of a .txt/.jsonl file's bytes (or its lines); each line is decoded on its own, so one bad byte costs
    one line. A UTF-8 byte order mark at the start is not part of the first text."""
    lines = data.split(b"\n") if isinstance(data, bytes) else data
    for number, line in enumerate(lines, 1):
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        record = parse_line(number, line.rstrip(b"\n"), kind, field)
        if record is not None:
            yield record


def detect_kind(path: Path) -> str:
    """'hf' for a folder written by datasets' save_to_disk, 'parquet' for .parquet files, 'jsonl', else 'txt'."""
    if not path.exists():
        raise HeadscopeError(NO_INPUT.format(path=path))
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        if not parquet_files(path):
            raise HeadscopeError(NO_PARQUET.format(path=path))
        return "parquet"
    check_not_a_table(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "txt"


def parquet_files(path: Path) -> list[str]:
    """A Parquet file, or a folder's .parquet files (recursively) in name order: the order rows are numbered in."""
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.rglob("*.parquet") if p.is_file())


def check_column(path: Path, column: str, columns: list[str]) -> None:
    if column not in columns:
        raise HeadscopeError(NO_COLUMN.format(path=path, column=column, columns=", ".join(columns) or "none"))


def load_hf(path: Path):
    """A datasets.Dataset saved with save_to_disk; a DatasetDict must be narrowed to one split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise HeadscopeError(f"{path} is not a saved dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        raise HeadscopeError(SPLITS.format(path=path, splits=", ".join(splits), first=splits[0]))
    return loaded


def records_from_columns(texts: list, ids: list | None, start: int, field: str) -> list[dict]:
    """Records of a batch of table rows numbered from `start` (1-based)."""
    return [make_record(start + i, value, None if ids is None else ids[i], field)
            for i, value in enumerate(texts)]


def plain_text_column(path: Path, kind: str, text_column: str) -> str:
    """`kind`, unless a text column other than the default is named for plain text (NO_COLUMNS)."""
    if kind == "txt" and text_column != "text":
        raise HeadscopeError(NO_COLUMNS.format(path=path, column=text_column))
    return kind


def check_input(path: Path | str, text_column: str = "text") -> str:
    """detect_kind, with a table's schema and text column read now: a bad input is refused before anything is
    written (iter_records and the Ray engine read the rest lazily)."""
    path = Path(path)
    kind = plain_text_column(path, detect_kind(path), text_column)
    if kind == "parquet":
        check_column(path, text_column, open_parquet(path).schema.names)
    elif kind == "hf":
        check_column(path, text_column, load_hf(path).column_names)
    return kind


def iter_records(path: Path | str, text_column: str = "text", batch_rows: int = 4096) -> Iterator[dict]:
    """Every record of `path`, in order, read in this process (the local engine's reader)."""
    path = Path(path)
    kind = plain_text_column(path, detect_kind(path), text_column)
    if kind in ("txt", "jsonl"):
        try:
            with path.open("rb") as lines:  # streamed: a file larger than memory is fine
                yield from parse_lines(lines, kind, text_column)
        except OSError as exc:
            raise HeadscopeError(f"Cannot read {path}: {exc.strerror}.") from None
        return
    if kind == "hf":
        table = load_hf(path).data.table  # memory-mapped Arrow: nothing is read until the batches are
        check_column(path, text_column, table.column_names)
        batches = table.to_batches(max_chunksize=batch_rows)
    else:
        dataset = open_parquet(path)
        check_column(path, text_column, dataset.schema.names)
        columns = [text_column] + (["id"] if "id" in dataset.schema.names and text_column != "id" else [])
        batches = dataset.to_batches(columns=columns, batch_size=batch_rows)
    number = 1
    for batch in _read(path, batches):
        ids = batch.column("id").to_pylist() if "id" in batch.schema.names and text_column != "id" else None
        texts = batch.column(text_column).to_pylist()
        yield from records_from_columns(texts, ids, number, text_column)
        number += len(texts)


def open_parquet(path: Path):
    """The pyarrow dataset of a Parquet file or folder, or BAD_PARQUET (an empty, truncated or foreign file)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    try:
        return pads.dataset(parquet_files(path), format="parquet")
    except (pa.ArrowException, OSError) as exc:
        raise _bad_parquet(path, exc) from None


def _read(path: Path, batches: Iterable) -> Iterator:
    """`batches`, a damaged part's error as BAD_PARQUET."""
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, OSError) as exc:
        raise _bad_parquet(path, exc) from None


def _bad_parquet(path: Path, exc: Exception) -> HeadscopeError:
    return HeadscopeError(BAD_PARQUET.format(path=path, reason=" ".join(str(exc).split())[:200]))
