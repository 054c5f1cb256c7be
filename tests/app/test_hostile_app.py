"""Hostile links and uploads through AppTest: every one ends in a sentence on the page, never Streamlit's exception
page, and user text is shown as literal characters (escaped for Markdown)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from analysis import HeadscopeError
from analysis.loading import REFUSED_PATH
from reports.untrusted import LINK_BAD_NUMBER, literal, plain

APP = str(Path(__file__).resolve().parents[2] / "streamlit_app.py")
TIMEOUT = 120
IMAGE = "![x](http://127.0.0.1:9/pixel.png)"
LINK = "[Session expired: sign in](http://127.0.0.1:9/login)"
# Outside code spans: Markdown that would make a link or an image ("![", "](" not escaped), or a bare URL, a
# "www." or an e-mail address, which GitHub-flavoured Markdown links by itself even when escaped
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
ACTIVE_MARKDOWN = re.compile(r"(?<!\\)!(?<!\\)\[|(?<!\\)\]\(|://|www\.|@|(?<!\\)<")


def active_markdown(text: str) -> bool:
    return bool(ACTIVE_MARKDOWN.search(CODE_SPAN.sub("", text)))


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """Cold caches, and no operator settings unless a test sets them."""
    monkeypatch.delenv("HEADSCOPE_MODEL_DIRS", raising=False)
    monkeypatch.delenv("HEADSCOPE_MODEL", raising=False)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def errors(at: AppTest) -> list[str]:
    return [element.value for element in at.error]


def warnings(at: AppTest) -> list[str]:
    return [element.value for element in at.warning]


def markdown_texts(at: AppTest) -> list[str]:
    """Every string the page renders as Markdown: alerts, markdown, captions and the status box's label."""
    texts = [e.value for kind in (at.error, at.warning, at.info, at.success, at.caption) for e in kind]
    texts += [e.value for e in at.markdown if "<span" not in e.value]  # the token strip is escaped HTML
    texts += [e.label for e in at.get("status")]
    return texts


def shows_head(at: AppTest, layer: int, head: int) -> bool:
    """The page drew the analysis: the selected head's attention pattern is among the charts."""
    return any(f"Attention pattern of L{layer}H{head}" in e.proto.spec for e in at.get("vega_lite_chart"))


@pytest.mark.parametrize("payload", [IMAGE, LINK])
def test_markdown_in_a_link_is_never_rendered(payload):
    at = run_app(model=payload)
    assert not at.exception
    assert errors(at) == [plain(REFUSED_PATH)]  # neither a hub id nor an allowed path
    assert at.text_input(key="model_typed").value == payload  # the form keeps it as typed, to fix
    texts = markdown_texts(at)
    assert not [text for text in texts if active_markdown(text)], texts


def test_a_model_id_quoted_in_an_error_is_escaped():
    at = run_app(model="__bold__")  # a valid hub id, not cached: the message quotes it
    assert not at.exception
    (error,) = errors(at)
    assert "'\\_\\_bold\\_\\_' is not in the local Hugging Face cache" in error
    assert "'__bold__'" not in error


def test_markdown_in_a_typed_model_and_the_text_is_escaped():
    at = run_app()
    at.text_input(key="model_typed").set_value(f"{IMAGE} {LINK}")
    at.button[0].click()
    at.run()
    assert not at.exception
    assert errors(at) == [plain(REFUSED_PATH)]
    assert not [text for text in markdown_texts(at) if active_markdown(text)]


@pytest.mark.parametrize("name, value", [("layer", "99999999999999999999"), ("layer", "²"), ("head", "²"),
                                         ("head", "-1"), ("layer", "1e3"), ("layer", "３"), ("head", " 4")])
def test_a_bad_number_in_the_link_is_ignored_with_a_notice(name, value):
    at = run_app(**{name: value})
    assert not at.exception and not errors(at)
    assert warnings(at)[0] == LINK_BAD_NUMBER.format(name=name, value=literal(value), max=9999)
    assert shows_head(at, 3, 0)  # analysed with the default instead
    # the link is rewritten with the values used, so a reload does not bring the bad value back
    assert at.query_params["layer"] == "3" and at.query_params["head"] == "0"
    at.button[0].click()
    at.run()
    assert not warnings(at)  # Analyse with the form's values: the link's notice has done its job


def test_refused_paths_get_the_same_message_whether_they_exist_or_not(tmp_path):
    seen = {}
    for name in ("/root", "/nonexistent", str(tmp_path), "/etc/passwd", "~", "../../etc"):
        at = run_app(model=name)
        assert not at.exception
        seen[name] = errors(at)
    assert all(value == [plain(REFUSED_PATH)] for value in seen.values()), seen


def test_a_checkpoint_under_an_operator_directory_loads(gpt2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(tmp_path))  # not where the checkpoint is: refused
    at = run_app(model=str(gpt2_path))
    assert errors(at) == [plain(REFUSED_PATH)]
    st.cache_resource.clear()
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", f"{tmp_path}:{gpt2_path.parent}")
    at = run_app(model=str(gpt2_path), layer="6")
    assert not at.exception and not errors(at)
    assert shows_head(at, 6, 0)


def test_the_operator_directories_can_come_from_a_streamlit_secret(gpt2_path):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.secrets["HEADSCOPE_MODEL_DIRS"] = str(gpt2_path.parent)  # Settings -> Secrets on Community Cloud
    at.query_params["model"] = str(gpt2_path)
    at.run()
    assert not at.exception and not errors(at)
    assert shows_head(at, 6, 0)  # the middle layer of the tiny GPT-2's 8


def test_a_nul_and_an_override_in_the_text_link(monkeypatch):
    at = run_app(text="a\x00b \u202eevil")
    assert not at.exception and not errors(at)
    downloads = [button.proto.label for button in at.get("download_button")]
    assert "Download the text (report.text.txt)" in downloads  # the report's reproduce command reads it


@pytest.fixture
def tiny_default(gpt2_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(gpt2_path))
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(gpt2_path))


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="corpus_file").set_value((name, data, "text/plain")).run()
    at.button(key="corpus_run").click().run()
    return at


def test_an_upload_of_too_many_texts_is_refused(tiny_default):
    at = upload(run_app(), "many.txt", "\n".join(f"text {i}" for i in range(1001)).encode())
    assert not at.exception
    assert plain("many.txt holds 1,001 texts; the app analyses at most 1,000 per upload: split the file, or use "
                 "python -m reports --batch.") in errors(at)


def test_an_upload_past_the_byte_limit_is_refused(tiny_default):
    at = upload(run_app(), "big [x](http://a).txt", b"a" * (5 * 2**20 + 1))  # Streamlit's MB are MiB
    assert not at.exception
    assert "big `[x](http://a).txt` is 5.0 MB; the app takes files up to 5 MB" in " ".join(errors(at))
    assert not [text for text in errors(at) if active_markdown(text)]


def test_a_deeply_nested_line_costs_only_itself(tiny_default):
    lines = [b'{"text": "the cat sat on the mat"}', b"[" * 100_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
             b'{"text": "bad \xff byte"}', b'{"text": "a dog ran home"}']
    at = upload(run_app(), "texts.jsonl", b"\n".join(lines))
    assert not at.exception and not errors(at)
    assert any("2 of 5 texts analysed" in caption.value for caption in at.caption)
    skipped = warnings(at)
    assert "Text 2 was skipped: line 2 is JSON nested too deeply to read." in skipped
    assert "Text 3 was skipped: line 3 is JSON nested too deeply to read." in skipped
    assert "Text 4 was skipped: line 4 is not UTF-8 text (bad byte at offset 14 of the line)." in skipped
    (spec,) = [json.loads(e.proto.spec) for e in at.get("vega_lite_chart") if "mean over 2 texts" in e.proto.spec]
    assert spec


def test_many_skipped_texts_are_one_warning_and_a_table_not_a_box_each(tiny_default):
    """An upload whose texts mostly fail drew a warning box per text (999 boxes for 999 of 1,000); past a few they
    are one warning and a table of every skipped text with its error, as the CLI's index.html lists them."""
    lines = [b'{"text": "the cat sat on the mat"}', *[b'{"text": ""}'] * 12, b'{"text": "a dog ran home"}']
    at = upload(run_app(), "texts.jsonl", b"\n".join(lines))
    assert not at.exception and not errors(at)
    assert any("2 of 14 texts analysed" in caption.value for caption in at.caption)
    assert warnings(at) == ["12 texts were skipped; each with its error:"]
    (table,) = [frame.value for frame in at.dataframe if "error" in frame.value.columns]
    assert table["text"].tolist() == list(range(2, 14))
    assert set(table["error"]) == {'The text is empty: type a sentence to analyse.'}


def test_an_unexpected_failure_of_the_corpus_is_one_line_and_keeps_the_last_results(tiny_default, gpt2_path,
                                                                                      monkeypatch):
    """The one-text and beyond tabs turn an exception nobody foresaw into one sentence; the corpus upload and the
    results folder let it through as a traceback (st.exception), and the results already on the page went with it."""
    import analysis.corpus
    import analysis.corpus_store

    at = upload(run_app(), "good.jsonl", b'{"text": "the cat sat on the mat"}\n{"text": "a dog ran home"}')
    assert not at.exception and any("2 of 2 texts analysed" in c.value for c in at.caption)

    def boom(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(analysis.corpus, "analyze_corpus", boom)
    monkeypatch.setattr(analysis.corpus_store, "load_results", boom)
    at = upload(at, "other.jsonl", b'{"text": "a bird flew off"}')
    at.text_input(key="corpus_results_dir").set_value(str(gpt2_path)).run()
    at.button(key="corpus_open").click().run()
    assert not at.exception
    assert errors(at) == [plain("The analysis failed unexpectedly (RuntimeError: the device went away). Try another "
                                "model, device or dtype, or a shorter text; the server log has the details.")]
    assert any("good.jsonl" in c.value and "2 of 2 texts analysed" in c.value for c in at.caption)  # still shown


def test_a_results_folder_outside_the_operator_directories_is_refused(tmp_path, monkeypatch):
    from analysis.loading import REFUSED_DIR

    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(tmp_path / "allowed"))
    messages = []
    for folder in ("/root", "/nonexistent", str(tmp_path), str(tmp_path / "allowed" / ".." / "x")):
        at = run_app()
        at.text_input(key="corpus_results_dir").set_value(folder).run()
        at.button(key="corpus_open").click().run()
        assert not at.exception
        messages.append(errors(at))
    assert messages == [[plain(REFUSED_DIR)]] * 4  # one message whether the folder exists or not


def test_an_upload_with_a_byte_order_mark_reads_as_the_same_file_without_it(tiny_default):
    """A file saved as "UTF-8" by Notepad starts with a BOM: the upload is the same texts, measured the same (its
    first JSON line was skipped as "not a JSON object", its first plain line measured with a U+FEFF token)."""
    lines = ['{"text": "the cat sat on the mat"}', '{"text": "a dog ran far from home"}']
    for name, data in (("texts.jsonl", "\r\n".join(lines).encode()), ("texts.txt", b"the cat sat\r\na dog ran\r\n")):
        tables = []
        for upload_data in (data, b"\xef\xbb\xbf" + data):
            at = upload(run_app(), name, upload_data)
            assert not at.exception and not errors(at) and not warnings(at)
            assert any("2 of 2 texts analysed" in caption.value for caption in at.caption)
            tables.append(at.dataframe[-1].value)
        assert tables[0].equals(tables[1])


def test_an_upload_whose_every_text_fails_keeps_the_last_corpus_results(tiny_default, gpt2):
    """A file of texts all too long for the model is refused in one line, as a file of bad lines is, and the
    last good corpus stays on the page (it was replaced by '0 of 2 texts analysed', an empty atlas and a warning
    per text)."""
    from analysis import capture

    at = upload(run_app(), "good.txt", b"the cat sat on the mat\na dog ran far from home\n")
    good = at.dataframe[-1].value
    long_texts = ["word " * 300, "cat " * 400]
    with pytest.raises(HeadscopeError) as first:  # the engine's own error for the first text
        capture(gpt2, long_texts[0])
    at = upload(at, "long.txt", "\n".join(long_texts).encode())
    assert not at.exception and not warnings(at)
    assert errors(at) == [plain(f"No text in long.txt could be analysed (2 tried); text 1: {first.value}")]
    assert any("2 of 2 texts analysed" in caption.value for caption in at.caption)
    assert at.dataframe[-1].value.equals(good)
