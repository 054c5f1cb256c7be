"""Property tests of the corpus mode's readers (analysis.corpus_io, analysis.corpus_store): random lines and a
random results manifest give records / a result or one HeadscopeError, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import HeadscopeError
from analysis.corpus_io import parse_lines
from analysis.corpus_store import MANIFEST, MANIFEST_SCHEMA, load_results
from tests.analysis.test_hostile_parse import bad_lines, json_values

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(st.one_of(bad_lines, st.binary(max_size=200)), max_size=10), st.sampled_from(["txt", "jsonl"]))
def test_every_line_becomes_a_record_or_its_error(lines, kind):
    data = b"\n".join(line.replace(b"\n", b"") for line in lines)
    records = list(parse_lines(data, kind))
    for record in records:
        assert (record["text"] is None) == (record["error"] is not None)
        assert record["error"] is None or "\n" not in record["error"]


manifests = st.one_of(
    json_values,
    st.fixed_dictionaries({"schema": st.just(MANIFEST_SCHEMA)}, optional={"model": json_values,
                                                                         "settings": json_values}),
)


@SETTINGS
@given(st.one_of(manifests.map(json.dumps), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_a_results_folder_with_a_random_manifest(manifest):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / MANIFEST).write_text(manifest, encoding="utf-8")
        try:
            load_results(tmp, n_boot=10)
        except HeadscopeError as exc:
            assert "\n" not in str(exc)
