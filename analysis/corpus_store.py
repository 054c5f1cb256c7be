"""Corpus results kept on disk: a Parquet dataset of per-text rows and a corpus.json manifest, whichever engine ran.

A results folder DIR holds
  DIR/rows/*.parquet  one row per input record (ROW_SCHEMA): number, id, text_hash, excerpt, n_tokens, error, and
                      every per-head number of the corpus atlas as a list column, flattened row-major:
                      CORPUS_MEASURES have layer * head entries ([layer][head]), LAYER_MEASURES have layer entries;
                      a bad or failed record has its error and nulls there;
  DIR/corpus.json     the manifest (MANIFEST_SCHEMA): model id and revision, the settings, library versions (the last
                      run's), counts, and one entry per run (engine, times, rows written, rows skipped, the versions
                      and headscope commit that computed them).
A rerun into the same DIR skips every record whose (number, text_hash) already has a row, so an interrupted run
resumes where it stopped and nothing is computed twice. Before any model is loaded (minutes, for a large one), a
rerun makes every check that needs none (`ResultsFolder.check_rerun`): the manifest, the settings, the text column
and dtype, and the input's records against the rows (`compare_input`): the input is the folder's when no row is of
a text it no longer has at that number, wherever the file now is (a moved or copied file resumes). Rows of texts
that changed or that the input no longer has are dropped only when the input is the recorded file edited in place
(the recorded path and the same file there, by device and inode: not another file put at that path), some rows'
texts still there and none gone (its changed texts are then analysed again), or when the caller says
the input changed (`input_changed`, --input-changed); otherwise the run refuses (INPUT_CHANGED) and writes nothing,
so two corpora never mix and no row still valid for the folder's input is lost. A record whose text is the row's
but whose id changed keeps its numbers and takes the input's id (its row's id is rewritten, nothing analysed
again). The model's own checks (id, revision, sizes) follow its load (`ResultsFolder.open`), and only then are rows
dropped or relabelled (`ResultsFolder.reconcile`). Rows are written in parts (a part file appears whole, by
rename), so an interruption loses at most the part being built.

`load_results(DIR)` turns the rows back into analysis.corpus.CorpusResult: means and bootstrap intervals are
computed from the Parquet rows by the same code whichever engine wrote them.

This module never imports Ray; analysis.corpus_ray does, and only when the Ray engine is asked for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.capture import unk_is_word
from analysis.commit import git_commit, library_versions
from analysis.corpus import (
    CORPUS_MEASURES,
    LAYER_MEASURES,
    LEVEL,
    N_BOOT,
    NO_TEXTS,
    SEED,
    UNEXPECTED,
    CorpusResult,
    TextRecord,
    capture_texts,
    compute_bootstrap_ci,
    excerpt,
    read_ahead,
    text_values,
)
from analysis.corpus_io import iter_records
from analysis.errors import HeadscopeError
from analysis.loading import LoadedModel, one_line
from analysis.pipeline import BATCH_SIZE
from analysis.results import MODEL_KEYS, SCORE_DEFINITION, SCORE_DEFINITIONS, score_definition

log = logging.getLogger(__name__)

MANIFEST = "corpus.json"
ROWS = "rows"
MANIFEST_SCHEMA = "headscope.corpus-results/1"
FLUSH_ROWS = 256  # rows per part file written by the local engine: what an interruption can lose at most
RESULT_SETTINGS = ("exclude_first_token", "exclude_current_token")  # settings that change the numbers
MODEL_CHECKED = ("id", "revision", "n_layers", "n_heads", "dtype", "causal")  # what must match for rows to be
# comparable; causal: the same weights under the config's is_causal (loading.attention_is_causal) are other rows
STORAGE = ("pyarrow", "datasets", "ray")  # what reads a corpus and writes a results folder (beside commit.COMPUTING)
ROW_SCHEMA = pa.schema([("number", pa.int64()), ("id", pa.string()), ("text_hash", pa.string()),
                        ("excerpt", pa.string()), ("n_tokens", pa.int64()), ("error", pa.string())]
                       + [(name, pa.list_(pa.float64())) for name in CORPUS_MEASURES + LAYER_MEASURES])
NOT_RESULTS = ("{path} is not a headscope results folder (no {manifest}): run python -m reports --batch FILE "
               "--results DIR.")
OTHER_MODEL = ("{path} holds results of {old} ({key} {old_value!r}), not {new_value!r}: use a new --results folder "
               "or the same model and settings.")
BAD_MANIFEST = "{path} is not a readable headscope manifest: {reason}."
ROWS_MISMATCH = ("{path}'s rows do not fit its manifest: {name} holds {size} values where {n} texts of {layers} "
                 "layer(s) x {heads} head(s) need {need}. Write the results again into a new --results folder.")
OTHER_COLUMN = ("{path} holds the rows of {old}'s column {old_column!r}, not of column {column!r}: rows are matched "
                "to texts by their number, so another column's would be averaged in. Use a new --results folder.")
INPUT_CHANGED = ("{path} holds the rows of {old}, and {new} differs from them: {what}. Rerun with --input-changed to "
                 "analyse {new} as it is now (the rows of texts it changed or no longer has are dropped, its changed "
                 "texts analysed again), or use a new --results folder to keep these rows.")
CHANGED_TEXTS = "{n} of its texts are not the rows' ({numbers})"
GONE_TEXTS = "{n} rows of texts it no longer has ({numbers})"
NOT_THAT_FILE = ("it is not the file recorded at that path (another put there, or the file saved anew: sed -i and many "
                 "editors write a new file)")
NO_IDENTITY = "the folder does not record which file was at that path (written before headscope recorded it)"
GONE_ONLY = ("{path} holds {n} rows of texts {new} no longer has ({numbers}): rerun with --input-changed to drop them "
             "(every other row is kept), or use a new --results folder to keep them.")
NO_SOURCE = ("{path} already holds rows: give the input's path (source=...) so that its texts are compared with "
             "them before any is analysed.")
UNREADABLE_PART = ("{part} cannot be read ({error}): rerun python -m reports --batch INPUT --results {folder} to set "
                   "it aside and analyse its texts again (reading the folder changes nothing in it).")
SHOWN_NUMBERS = 3  # record numbers a refusal names
RETRIED_ERRORS = UNEXPECTED.split("{")[0]  # the start of a row's error that a rerun analyses again (a bug's)
OLD_BOS = ("{path} holds head scores from before exclude_bos (position 0 was always left out of them; now only a "
           "BOS/CLS token is): use a new --results folder.")
OLD_SCORES = ("{path} holds an encoder's duplicate-token and induction scores from before 2026-12-07, which counted "
              "only the earlier copies of the query's token (now every other copy it sees): use a new --results "
              "folder.")
OLD_UNK = ("{path} holds rows from before {model}'s unknown token counted as a word of the text (it was a special "
           "token: never the default query, left out of the keys), so its rows and this run's would differ: use a new "
           "--results folder.")

Progress = Callable[[int, int], None]  # (records seen, rows written this run)


def versions() -> dict[str, str | None]:
    """headscope's and the libraries' versions for the manifest (None: not installed). Imports nothing."""
    from analysis import __version__

    return {"headscope": __version__, **library_versions(STORAGE)}


def analyze_records(loaded: LoadedModel, records: Iterable[dict], exclude_first_token: bool = True,
                    exclude_current_token: bool = False, exclude_bos: bool = True,
                    batch_size: int = BATCH_SIZE) -> list[dict]:
    """Per-text rows (ROW_SCHEMA) for a batch of records (analysis.corpus_io): the one place both engines analyse.

    The records' texts go through corpus.capture_texts, `batch_size` per padded pass (grouped by padded width, no
    T x T pattern kept), then corpus.compute_text_values. A text's numbers depend on the text alone, not on which
    other records share its batch, so engines that cut the corpus into batches differently write the same rows.
    A bad record, or a text the engine refuses (too many tokens, ...), becomes a row with its error.
    """
    model = loaded.info.to_dict()
    records = list(records)
    results = iter(capture_texts(loaded, [record["text"] for record in records if record["error"] is None],
                                 batch_size, text_values(model, exclude_first_token, exclude_current_token,
                                                         exclude_bos), exclude_first_token))
    rows = []
    for record in records:
        row = {"number": int(record["number"]), "id": record["id"], "text_hash": record["text_hash"],
               "excerpt": "" if record["text"] is None else excerpt(record["text"]), "n_tokens": None,
               "error": record["error"]}
        if record["error"] is None:
            result = next(results)
            if isinstance(result, Exception):  # a HeadscopeError: the text's own, or an unexpected one worded
                row["error"] = str(result)
            else:
                heads, layers, row["n_tokens"] = result
                row.update({name: heads[name].ravel().tolist() for name in CORPUS_MEASURES})  # [layer * head]
                row.update({name: layers[name].tolist() for name in LAYER_MEASURES})  # [layer]
        rows.append(row)
    return rows


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def result_settings(exclude_first_token: bool = True, exclude_current_token: bool = False) -> dict:
    """What the manifest records; exclude_bos (the head scores leave out position 0 only when it is a special
    token, issue 12) is always on here, and a folder written before it existed is not resumed. unk_is_word: the
    unknown token is a word of the text (capture.marked_special_ids, since 55af575); a folder written before it is
    not resumed with a model whose unknown token that changes (capture.unk_is_word), checked once it is loaded.
    score_definition: the copies duplicate-token and induction count (results.SCORE_DEFINITIONS); an encoder's
    folder written before it holds the earlier copies' numbers and is not resumed (a causal model's: the same)."""
    return {"exclude_first_token": exclude_first_token, "exclude_current_token": exclude_current_token,
            "exclude_bos": True, "unk_is_word": True, "score_definition": SCORE_DEFINITION}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class ResultsFolder:
    """A results folder: its manifest, its row parts, and what is already done."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def rows_dir(self) -> Path:
        return self.path / ROWS

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict:
        if not self.exists():
            raise HeadscopeError(NOT_RESULTS.format(path=self.path, manifest=MANIFEST))
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise HeadscopeError(BAD_MANIFEST.format(path=self.manifest_path, reason=exc)) from None
        if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
            reason = f"schema is not {MANIFEST_SCHEMA}"
            raise HeadscopeError(BAD_MANIFEST.format(path=self.manifest_path, reason=reason))
        model, settings = data.get("model"), data.get("settings")  # a hand-edited manifest: checked before use
        if not isinstance(model, dict) or not all(type(model.get(key)) is int and model[key] >= 1
                                                  for key in ("n_layers", "n_heads")):
            reason = "its model has no positive whole n_layers and n_heads"
            raise HeadscopeError(BAD_MANIFEST.format(path=self.manifest_path, reason=reason))
        if not isinstance(settings, dict) or not all(isinstance(settings.get(key), bool) for key in RESULT_SETTINGS):
            reason = f"its settings lack {' or '.join(RESULT_SETTINGS)} (true or false)"
            raise HeadscopeError(BAD_MANIFEST.format(path=self.manifest_path, reason=reason))
        reason = _manifest_fault(data)
        if reason:
            raise HeadscopeError(BAD_MANIFEST.format(path=self.manifest_path, reason=reason))
        return data

    def write_manifest(self, data: dict) -> None:
        tmp = self.path / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
        os.replace(tmp, self.manifest_path)

    def open(self, model: dict, settings: dict, source: str, text_column: str, unk_is_word: bool = False) -> dict:
        """Create the folder and its manifest, or check that an existing one holds comparable rows: the model's
        (`_check_model`), the settings, and, when the loaded model's unknown token is a word (`unk_is_word`,
        capture.unk_is_word of its tokenizer), that the folder's analysed rows were written under that rule (OLD_UNK);
        a folder where the rule changes nothing (no analysed row, or a model whose unknown token it leaves special)
        records it."""
        try:
            self.rows_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HeadscopeError(f"Cannot create {self.rows_dir}: {exc.strerror}.") from None
        if self.exists():
            manifest = self.read_manifest()
            _check_model(self.path, manifest, model)
            _check_settings(self.path, manifest, settings, text_column)
            if manifest["settings"].get("unk_is_word") is not True:
                if unk_is_word and self.read_rows(["error"])["error"].null_count:  # numbers under the old rule
                    raise HeadscopeError(OLD_UNK.format(path=self.path, model=manifest["model"].get("id")))
                manifest["settings"]["unk_is_word"] = True  # the rule changes nothing here: from now on, recorded
                self.write_manifest(manifest)
            return manifest
        manifest = {"schema": MANIFEST_SCHEMA, "model": {key: model[key] for key in MODEL_KEYS},
                    "settings": {**settings, "text_column": text_column}, "source": _absolute(source),
                    "shapes": {"head_measures": list(CORPUS_MEASURES), "layer_measures": list(LAYER_MEASURES),
                               "head_list": "[layer][head] flattened row-major", "layer_list": "[layer]"},
                    "versions": versions(), "counts": {"rows": 0, "analysed": 0, "failed": 0}, "runs": []}
        self.write_manifest(manifest)
        return manifest

    def part_files(self) -> list[Path]:
        if not self.rows_dir.is_dir():
            return []
        return sorted(p for p in self.rows_dir.rglob("*.parquet") if not p.name.startswith("."))

    def read_rows(self, columns: list[str] | None = None, set_aside: bool = True) -> pa.Table:
        """Every row, in input order. A part file that cannot be read (a write cut short) is set aside as *.broken,
        so its records count as not done; set_aside=False (a reader: --from-results, the app) changes nothing in
        the folder and refuses such a part (UNREADABLE_PART). When a record number has rows from several parts (its
        text changed between runs), the row of the most recently written part is the one kept."""
        wanted = None if columns is None else list(dict.fromkeys(["number", *columns]))
        tables = []
        parts = sorted(self.part_files(), key=lambda part: (part.stat().st_mtime_ns, part.name))
        for order, part in enumerate(parts):
            table = _read_part(part, wanted, None if set_aside else self.path)
            if table is None:
                continue
            tables.append(table.append_column("__part", pa.array([order] * table.num_rows, pa.int64())))
        schema = ROW_SCHEMA if wanted is None else pa.schema([ROW_SCHEMA.field(c) for c in wanted])
        if not tables:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        table = pa.concat_tables(tables).sort_by([("number", "ascending"), ("__part", "ascending")])
        numbers = table["number"].to_numpy()
        last = np.append(numbers[1:] != numbers[:-1], True)  # [row]: the last row of each number
        if not last.all():
            table = table.filter(pa.array(last))
        table = table.drop_columns(["__part"])
        return table if columns is None else table.select(columns)

    def done_keys(self) -> set[tuple[int, str]]:
        """(number, text_hash) of every record that already has a row."""
        table = self.read_rows(["number", "text_hash"])
        return set(zip(table["number"].to_pylist(), table["text_hash"].to_pylist()))

    def row_keys(self) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
        """(number, text_hash) of the records whose row a run keeps, and of those it analyses again: a row whose
        error is an exception the analysis did not foresee (corpus.UNEXPECTED: a bug, perhaps fixed since, as a
        multi-query model's IndexError before 20f4617), not a refusal of the text itself (empty, too long, not
        UTF-8...), which would come again."""
        table = self.read_rows(["number", "text_hash", "error"])
        keys = list(zip(table["number"].to_pylist(), table["text_hash"].to_pylist()))
        retry = {key for key, error in zip(keys, table["error"].to_pylist())
                 if error is not None and error.startswith(RETRIED_ERRORS)}
        return set(keys) - retry, retry

    def superseded_errors(self) -> set[tuple[int, str]]:
        """(number, text_hash) of the records with an error row and a newer analysed row of the same text: what a
        retry leaves when its run is killed after writing the new row and before drop_replaced (read_rows shows only
        the newer, a reader of the raw Parquet both)."""
        errors = set()
        for part in self.part_files():
            table = _read_part(part, ["number", "text_hash", "error"])
            if table is not None:
                errors.update((number, digest) for number, digest, error in zip(
                    table["number"].to_pylist(), table["text_hash"].to_pylist(), table["error"].to_pylist())
                    if error is not None)
        if not errors:
            return set()
        latest = self.read_rows(["number", "text_hash", "error"])
        return errors & {(number, digest) for number, digest, error in zip(
            latest["number"].to_pylist(), latest["text_hash"].to_pylist(), latest["error"].to_pylist())
            if error is None}

    def drop_replaced(self, replaced: set[tuple[int, str]], parts: Iterable[Path]) -> None:
        """Remove from `parts` (those written before a run) the error rows of `replaced`, the retried records whose
        new rows the run wrote, so that each keeps one row. A part keeps its name and modification time; a part left
        without rows is removed."""
        for part in parts:
            table = _read_part(part, None) if replaced and part.exists() else None
            if table is None:
                continue
            keep = [error is None or (number, digest) not in replaced  # [row]
                    for number, digest, error in zip(table["number"].to_pylist(), table["text_hash"].to_pylist(),
                                                      table["error"].to_pylist())]
            if not all(keep):
                _rewrite_part(part, table, keep)

    def latest_rows(self) -> tuple[dict[int, str], dict[int, str]]:
        """({number: text_hash}, {number: id}) of the row read_rows keeps for each number."""
        table = self.read_rows(["number", "text_hash", "id"])
        numbers = table["number"].to_pylist()
        return dict(zip(numbers, table["text_hash"].to_pylist())), dict(zip(numbers, table["id"].to_pylist()))

    def check_rerun(self, source: str, settings: dict, text_column: str = "text", dtype: str | None = None,
                    input_changed: bool = False) -> InputChange:
        """Every check of a run into this folder that needs no model, made before one is loaded; returns how the
        input differs from the rows, for `reconcile` to apply once `open` has checked the model. Nothing is written.

        An existing folder's manifest, settings, text column and (unless None) `dtype` must be the run's. Then the
        input (`source`, read here once more, no model) is compared with the rows (`compare_input`): it is the
        folder's when every row is of a text it still has at that number, the file being wherever it is now. Rows
        of texts it changed may be dropped (and those texts analysed again) when it is the recorded file edited in
        place (its path, and the device and inode `reconcile` recorded as `source_identity`: another file put at
        that path is not the same file), still holding some of the rows' texts and none gone. Anything else, a row
        of a text the input no longer has included, needs `input_changed`, or the run is refused (INPUT_CHANGED,
        GONE_ONLY). A new folder or one without rows has nothing to compare (`open` creates it); one with rows needs
        the input's path (NO_SOURCE)."""
        if not self.exists():
            return InputChange(0, [], [], 0, {})
        manifest = self.read_manifest()
        _check_settings(self.path, manifest, settings, text_column)
        if dtype is not None:  # the rest of the model (id, revision, sizes) is known once it is loaded
            _check_same(self.path, manifest, "dtype", manifest["model"].get("dtype"), dtype)
        rows, ids = self.latest_rows()
        if not rows:
            return InputChange(0, [], [], 0, {})
        if not (source and os.path.exists(source)):
            raise HeadscopeError(NO_SOURCE.format(path=self.path))
        change = compare_input(rows, iter_records(source, text_column), ids)
        if not change.current and not change.new:  # refused before --input-changed drops every row
            raise HeadscopeError(NO_TEXTS.format(source=source))
        if change.changed or change.gone:
            old = manifest.get("source") or ""
            identity = _identity(source)  # [device, inode]: the same file, not only the same path
            same = _same_file(old, source) and identity is not None and identity == manifest.get("source_identity")
            edited = bool(change.kept) and not change.gone and same
            if not (input_changed or edited):
                note = ("" if not (change.kept and not change.gone and _same_file(old, source))
                        else NO_IDENTITY if manifest.get("source_identity") is None else NOT_THAT_FILE)
                raise HeadscopeError(change_message(self.path, old, source, change, note))
        return change

    def reconcile(self, source: str, change: InputChange) -> tuple[int, int]:
        """After `open` has checked the model: make the rows those of the input as `check_rerun` found it (the rows
        of texts it changed or no longer has dropped, its ids on the rows of its unchanged texts) and record its
        path (a moved input: the folder follows it); returns (texts whose rows were dropped, records whose id was
        updated). The rows rewrite_rows removes may be more: a folder resumed by code before it also holds the
        superseded rows of texts changed then (read_rows never showed them), removed too but not counted."""
        if change.changed or change.gone or change.relabelled:
            self.rewrite_rows(change.current, change.relabelled)
        self.drop_replaced(self.superseded_errors(), self.part_files())  # a retry's old rows, left by a killed run
        manifest = self.read_manifest()
        if source and (manifest.get("source"), manifest.get("source_identity")) != (_absolute(source),
                                                                                    _identity(source)):
            manifest["source"], manifest["source_identity"] = _absolute(source), _identity(source)
            self.write_manifest(manifest)
        return len(change.changed) + len(change.gone), len(change.relabelled)

    def rewrite_rows(self, current: dict[int, str], relabelled: dict[int, str] | None = None) -> None:
        """Rewrite every part without its rows that are not of the input as it is now (`current`: {number:
        text_hash} of the input's records that have a row) and with the input's id on the rows of `relabelled`
        ({number: id}, texts unchanged) (_rewrite_part)."""
        relabelled = relabelled or {}
        for part in self.part_files():
            table = _read_part(part, None)
            if table is None:
                continue
            numbers, old_ids = table["number"].to_pylist(), table["id"].to_pylist()
            keep = [current.get(number) == digest  # [row]
                    for number, digest in zip(numbers, table["text_hash"].to_pylist())]
            new_ids = [relabelled.get(number, old) if kept else old  # [row]
                       for number, kept, old in zip(numbers, keep, old_ids)]
            if all(keep) and new_ids == old_ids:
                continue
            _rewrite_part(part, table.set_column(table.schema.get_field_index("id"), ROW_SCHEMA.field("id"),
                                                 pa.array(new_ids, pa.string())), keep)

    def write_part(self, table: pa.Table, name: str) -> Path:
        """One part file, appearing whole (written under a hidden name, then renamed)."""
        final = self.rows_dir / f"{name}.parquet"
        tmp = self.rows_dir / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        return final

    def finish_run(self, run: dict) -> dict:
        """Append the run to the manifest and recount the rows. The run's own failures (`new_failed`) are counted by
        its engine on the rows it wrote: the folder's failed count before and after would net out the failed rows
        the run dropped (a failing text replaced by another failing one counted 0). The run records the versions that
        computed its rows (`versions`, `git_commit`): the manifest's own `versions` are the last run's, and a folder
        resumed after an upgrade holds rows of both (the corpus page lists each run's)."""
        run.setdefault("versions", versions())
        run.setdefault("git_commit", git_commit())
        manifest = self.read_manifest()
        table = self.read_rows(["number", "error"])
        analysed = table["error"].null_count if table.num_rows else 0
        manifest["counts"] = {"rows": table.num_rows, "analysed": analysed, "failed": table.num_rows - analysed}
        manifest["runs"].append(run)
        manifest["versions"] = versions()
        self.write_manifest(manifest)
        return manifest


@dataclass(frozen=True)
class InputChange:
    """An input's records against a folder's rows: `kept` rows of its texts at their numbers, the numbers whose row is
    of another text (`changed`) or of no record of it (`gone`), its records without a row (`new`), `current`,
    {number: text_hash} of its records that have a row, and `relabelled`, {number: id} of its records whose text is
    their row's but whose id is not."""

    kept: int
    changed: list[int]
    gone: list[int]
    new: int
    current: dict[int, str] = field(repr=False)
    relabelled: dict[int, str] = field(default_factory=dict, repr=False)


def compare_input(rows: dict[int, str], records: Iterable[dict], ids: dict[int, str] | None = None) -> InputChange:
    """Compare an input's records with the rows ({number: text_hash}, and their {number: id} when `ids`), holding no
    more than one hash per row and one id per row whose id the input changed."""
    current: dict[int, str] = {}
    relabelled: dict[int, str] = {}
    new = 0
    for record in records:
        number = int(record["number"])
        if number in rows:
            current[number] = record["text_hash"]
            if ids is not None and record["text_hash"] == rows[number] and record["id"] != ids.get(number):
                relabelled[number] = record["id"]
        else:
            new += 1
    changed = sorted(number for number, digest in current.items() if rows[number] != digest)
    gone = sorted(number for number in rows if number not in current)
    return InputChange(len(current) - len(changed), changed, gone, new, current, relabelled)


def change_message(path: Path, old: str, new: str, change: InputChange, note: str = "") -> str:
    """The refusal of an input that is not the folder's, naming what differs and how to go on, and `note`: why an
    input at the recorded path is not taken as the recorded file edited in place (NOT_THAT_FILE, NO_IDENTITY)."""
    if not change.changed:
        return GONE_ONLY.format(path=path, n=len(change.gone), new=new, numbers=_numbers(change.gone))
    parts = [CHANGED_TEXTS.format(n=len(change.changed), numbers=_numbers(change.changed))]
    if change.gone:
        parts.append(GONE_TEXTS.format(n=len(change.gone), numbers=_numbers(change.gone)))
    if note:
        parts.append(note)
    return INPUT_CHANGED.format(path=path, old=old or "an input it did not record", new=new or "the input",
                                what="; ".join(parts))


def _check_same(path: Path, manifest: dict, key: str, old_value, new_value) -> None:
    """OTHER_MODEL unless the folder's `key` (of its model or settings) is the run's."""
    if old_value != new_value:
        raise HeadscopeError(OTHER_MODEL.format(path=path, old=manifest["model"].get("id"), key=key,
                                                old_value=old_value, new_value=new_value))


def _check_model(path: Path, manifest: dict, model: dict) -> None:
    """The folder's model (MODEL_CHECKED) against the loaded one. A local checkpoint is the same whatever path named
    it (./gpt2, /abs/gpt2, ../gpt2): its absolute directory (local_path) and its weights' hash (revision) are
    compared, not the id as typed; a folder written before local_path was recorded is matched on the hash alone."""
    old = manifest["model"]
    for key in MODEL_CHECKED:
        if key == "id" and model.get("local_path") is not None:
            if "local_path" not in old and str(old.get("revision", "")).startswith("sha256:"):
                continue  # an older manifest: the weights' sha256 (checked below) names the checkpoint
            if old.get("local_path") is not None:
                key = "local_path"
        if key == "causal" and key not in old:  # a manifest from before it was recorded: the family decided it
            continue
        _check_same(path, manifest, key, old.get(key), model.get(key))


def _check_settings(path: Path, manifest: dict, settings: dict, text_column: str) -> None:
    """The folder's settings that change the numbers, and its text column, against the run's: no model needed."""
    for key in RESULT_SETTINGS:
        _check_same(path, manifest, key, manifest["settings"].get(key), settings.get(key))
    if manifest["settings"].get("exclude_bos") != settings.get("exclude_bos", True):
        raise HeadscopeError(OLD_BOS.format(path=path))
    if (score_definition(manifest["settings"], bool(manifest["model"].get("causal", True)))
            != settings.get("score_definition", SCORE_DEFINITION)):
        raise HeadscopeError(OLD_SCORES.format(path=path))
    old_column = manifest["settings"].get("text_column", text_column)
    if old_column != text_column:
        raise HeadscopeError(OTHER_COLUMN.format(path=path, old=manifest.get("source") or "its input",
                                                 old_column=old_column, column=text_column))


def _manifest_fault(data: dict) -> str:
    """What is wrong with the parts of a manifest a run reads or extends (a hand edit), or "" when nothing is. Its
    counts are not read: every run recounts them from the rows."""
    settings = data["settings"]
    if not isinstance(data.get("source", ""), str):
        return "its source is not a path (a string)"
    if not isinstance(settings.get("text_column", ""), str):
        return "its settings' text_column is not a column name (a string)"
    if not isinstance(settings.get("exclude_bos", False), bool):
        return "its settings' exclude_bos is not true or false"
    if str(settings.get("score_definition", SCORE_DEFINITION)) not in SCORE_DEFINITIONS:
        return f"its settings' score_definition is not one of {', '.join(SCORE_DEFINITIONS)}"
    if not isinstance(data.get("runs"), list):
        return "its runs are not a list"
    return ""


def _numbers(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:SHOWN_NUMBERS]))
    more = len(numbers) - SHOWN_NUMBERS
    return f"number {shown}" if len(numbers) == 1 else f"numbers {shown}" + (f" and {more} more" if more > 0 else "")


def _absolute(source: str) -> str:
    """An input path as the manifest records it: absolute, so a rerun from another directory finds the same file."""
    return os.path.abspath(source) if source else ""


def _same_file(old: str, new: str) -> bool:
    """Whether an input is the file the folder recorded (by path, or the same file by another path)."""
    if not (old and new):
        return False
    if os.path.abspath(old) == os.path.abspath(new):
        return True
    try:
        return os.path.samefile(old, new)
    except OSError:
        return False


def _identity(source: str) -> list[int] | None:
    """[device, inode] of the input file or folder: what tells the recorded file edited in place (written into,
    the same inode) from another file put at its path (a new inode; the recorded one, if kept, is elsewhere)."""
    try:
        stat = os.stat(source)
    except (OSError, ValueError, TypeError):
        return None
    return [stat.st_dev, stat.st_ino]


def _read_part(part: Path, columns: list[str] | None, refuse_in: Path | None = None) -> pa.Table | None:
    """A part's rows, or None for a part that cannot be read (a write cut short), set aside as *.broken so that its
    records count as not done; with `refuse_in` (a reader's results folder), a HeadscopeError instead: a reader
    moves nothing (the error may be passing, a network file system's, and the folder another's, or read-only)."""
    try:
        return pq.read_table(part, columns=columns, schema=ROW_SCHEMA)
    except (OSError, pa.ArrowInvalid) as exc:
        if refuse_in is not None:
            raise HeadscopeError(UNREADABLE_PART.format(part=part, error=one_line(exc), folder=refuse_in)) from None
        log.warning("setting aside unreadable results part %s: %s", part, exc)
        os.replace(part, part.with_name(part.name + ".broken"))
        return None


def _rewrite_part(part: Path, table: pa.Table, keep: list[bool]) -> None:
    """`part` holding only the rows of `table` that `keep` marks, under its name and modification time (read_rows
    orders parts by it; written under a hidden name, then renamed over it), or removed when none is kept."""
    if not any(keep):
        part.unlink()
        return
    stat = part.stat()
    tmp = part.with_name(f".{part.name}.tmp")
    pq.write_table(table.filter(pa.array(keep)), tmp)
    os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp, part)


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_local(loaded: LoadedModel, records: Iterable[dict], folder: ResultsFolder | str | Path, source: str = "",
              text_column: str = "text", exclude_first_token: bool = True, exclude_current_token: bool = False,
              batch_size: int = 16, flush_rows: int = FLUSH_ROWS, progress: Progress | None = None,
              input_changed: bool = False, checked: InputChange | None = None, command: str | None = None) -> dict:
    """The local engine: analyse every record without a row in `folder`, in this process; returns the run entry
    (`command`: the command line that ran it, recorded in the entry and shown on the corpus page).

    `source` is the input's path: a rerun into a folder that holds rows reads it once more to compare its records
    with the rows before analysing (ResultsFolder.check_rerun; `input_changed` lets it drop rows). A caller that
    made that check before loading the model (the command line) passes its answer as `checked`. Records go to
    `analyze_records` `batch_size` at a time (corpus.READ_AHEAD batches on a GPU); rows are written as a part file
    every `flush_rows`. A record whose row holds an unexpected error is analysed again (`row_keys`): a row
    that is analysed now replaces the old one (`drop_replaced`), one that fails again leaves the old row as it was.
    """
    folder = folder if isinstance(folder, ResultsFolder) else ResultsFolder(folder)
    settings = result_settings(exclude_first_token, exclude_current_token)
    folder.open(loaded.info.to_dict(), settings, source, text_column,  # the model is loaded already: checked first
                unk_is_word(loaded.tokenizer))
    if checked is None:
        checked = folder.check_rerun(source, settings, text_column, input_changed=input_changed)
    dropped, relabelled = folder.reconcile(source, checked)
    done, retry = folder.row_keys()
    parts_before = folder.part_files()
    recovered: set[tuple[int, str]] = set()
    retried = 0
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    started, clock = _now(), time.perf_counter()
    pending: list[dict] = []
    seen = skipped = written = failed = parts = 0

    def flush():
        nonlocal pending, written, failed, parts
        if pending:
            folder.write_part(rows_to_table(pending), f"part-{run_id}-{parts:05d}")
            failed += sum(row["error"] is not None for row in pending)
            written, parts, pending = written + len(pending), parts + 1, []

    def todo():
        nonlocal seen, skipped
        for record in records:
            seen += 1
            key = (int(record["number"]), record["text_hash"])
            if key in done:
                skipped += 1
                continue
            yield record

    for chunk in _chunks(todo(), read_ahead(loaded.info.device, max(1, batch_size))):
        for row in analyze_records(loaded, chunk, exclude_first_token, exclude_current_token, batch_size=batch_size):
            key = (row["number"], row["text_hash"])
            if key in retry:  # its new row replaces the old one if it is analysed now, else the old row stays
                retried += 1
                if row["error"] is not None:
                    skipped += 1
                    continue
                recovered.add(key)
            pending.append(row)
        if len(pending) >= flush_rows:
            flush()
        if progress is not None:
            progress(seen, written + len(pending))
    flush()
    folder.drop_replaced(recovered, parts_before)
    run = {"engine": "local", "started": started, "finished": _now(), "seconds": round(time.perf_counter() - clock, 3),
           "records": seen, "new_rows": written, "new_failed": failed, "skipped": skipped, "dropped": dropped,
           "relabelled": relabelled, "retried": retried, "recovered": len(recovered), "batch_size": batch_size,
           "command": command}
    folder.finish_run(run)
    return run


def load_results(path: str | Path, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> CorpusResult:
    """The corpus result (means and bootstrap intervals over texts) from a results folder's rows."""
    folder = ResultsFolder(path)
    manifest = folder.read_manifest()
    model, settings = manifest["model"], manifest["settings"]
    n_layers, n_heads = int(model["n_layers"]), int(model["n_heads"])
    table = folder.read_rows(set_aside=False)
    ok = table.filter(table["error"].is_null())
    n = ok.num_rows

    def column(name: str, shape: tuple[int, ...]) -> np.ndarray:
        flat = ok[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)  # [text * ...]
        if flat.size != math.prod(shape):  # a manifest edited, or rows of another model copied in
            raise HeadscopeError(ROWS_MISMATCH.format(path=folder.path, name=name, size=flat.size, n=n,
                                                      layers=n_layers, heads=n_heads, need=math.prod(shape)))
        return flat.reshape(shape)

    values = {name: column(name, (n, n_layers, n_heads)) for name in CORPUS_MEASURES}  # [text, layer, head] each
    layer_values = {name: column(name, (n, n_layers)) for name in LAYER_MEASURES}  # [text, layer] each
    if n == 0:
        values = {name: np.empty((0, n_layers, n_heads)) for name in CORPUS_MEASURES}  # [text, layer, head]
        layer_values = {name: np.empty((0, n_layers)) for name in LAYER_MEASURES}  # [text, layer]
    means, low, high = {}, {}, {}
    for name, per_text in {**values, **layer_values}.items():
        means[name], low[name], high[name] = compute_bootstrap_ci(per_text, n_boot, seed, level)
    texts = tuple(TextRecord(number, text_excerpt, n_tokens, error) for number, text_excerpt, n_tokens, error in zip(
        table["number"].to_pylist(), table["excerpt"].to_pylist(), table["n_tokens"].to_pylist(),
        table["error"].to_pylist()))
    # a folder from before exclude_bos (e18b81f): exclude_first_token also left position 0 out of every text's head
    # scores, special or not, a rule no exclude_bos of today's is (None); kept, it is exclude_bos false
    exclude_bos = settings.get("exclude_bos", None if settings["exclude_first_token"] else False)
    return CorpusResult(model={key: model.get(key) for key in MODEL_KEYS}, texts=texts, values=values,
                        layer_values=layer_values, means=means, low=low, high=high,
                        exclude_first_token=bool(settings["exclude_first_token"]),
                        exclude_current_token=bool(settings["exclude_current_token"]), n_boot=n_boot, seed=seed,
                        level=level, exclude_bos=exclude_bos,
                        score_definition=score_definition(settings, bool(model.get("causal", True))))
