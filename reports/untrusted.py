"""Showing and reading what a user hands in: texts, model ids, file names and the app's link values.

Pure functions shared by the HTML reports and the app (no Streamlit here):
- `visible(text)`: control characters as visible symbols (U+2400 block for C0, "⟨U+202E⟩" for bidirectional
  controls, C1 controls and lone surrogates), so a NUL or a right-to-left override cannot hide or reorder text;
- `html_literal(text)`: that, HTML-escaped and inside <bdi> so right-to-left text stays in its own box;
- `shown_command(command)`: a shell command drawn only in characters a reader sees that, pasted, runs the same
  argv: an argument with any other character is ANSI-C quoted ($'...') with its bytes as \\xHH escapes;
- `literal(text)`: a Markdown code span that Streamlit shows as the literal characters (no link, image,
  emoji, colour or LaTeX can come out of it), for quoting a value;
- `plain(text)`: a whole sentence escaped for Markdown, for messages that quote user input (st.error);
- `parse_link(params)`: the app's link values (model, layer, head, text, query, dtype) with a notice for each bad
  one.
"""

from __future__ import annotations

import re
import shlex
import unicodedata

from markupsafe import Markup, escape

from analysis.choices import DTYPE_NAMES
from analysis.results import HEAD_SCORE_NAMES

BIDI_CONTROLS = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
KEPT = {"\n", "\t"}  # whitespace a <pre> shows as such
MAX_ARG_BYTES = 100_000  # Linux refuses one command-line argument past 128 KiB
LINK_INT_MAX = 9_999  # a layer or head from a link: 0..9999 (more than any model has; far below 2**53)
LINK_MODEL_MAX = 512  # characters of a model id or path from a link
LINK_TEXT_MAX = 100_000  # characters of a text from a link
LINK_BAD_NUMBER = "The link's {name} value {value} is not a whole number from 0 to {max}: it was ignored."
LINK_TOO_LONG = "The link's {name} is longer than {max:,} characters: it was ignored."
LINK_BAD_CHOICE = "The link's {name} value {value} is not one of {choices}: it was ignored."
LINK_BAD_SWITCH = "The link's {name} value {value} is not 1 (on) or 0 (off): it was ignored."
LINK_TEXT_LEFT_OUT = ("This link was made from a text longer than {max:,} characters, which a link does not carry: "
                      "the default text is shown instead. Paste that text into the form, or open the report made "
                      "from it.")
LINK_BAD_SCORE = ("The link's score value {value} is not text:NAME, or probe:NAME with probe=1, for a NAME in "
                  "{names}: it was ignored.")


def _visible_char(char: str) -> str:
    code = ord(char)
    if char in KEPT:
        return char
    if code < 0x20:
        return chr(0x2400 + code)  # ␀ ... ␟
    if code == 0x7F:
        return "\u2421"  # ␡
    if 0x80 <= code < 0xA0 or code in BIDI_CONTROLS or 0xD800 <= code < 0xE000 or code in (0x2028, 0x2029):
        return f"⟨U+{code:04X}⟩"
    return char


_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
                     "\ud800-\udfff]")


def visible(text: str) -> str:
    """`text` with every control character drawn as a visible symbol (newlines and tabs kept)."""
    return _HIDDEN.sub(lambda match: _visible_char(match.group()), text)


def html_literal(text) -> Markup:
    """Jinja filter: user text, visible and escaped, isolated from the surrounding text's direction."""
    return Markup("<bdi>") + escape(visible(str(text))) + Markup("</bdi>")


def fits_argument(text: str) -> bool:
    """Whether `text` is short enough for one command-line argument (Linux: 128 KiB each)."""
    return len(text.encode("utf-8", "surrogatepass")) <= MAX_ARG_BYTES


def needs_text_file(text: str) -> bool:
    """Whether a command line cannot carry `text` as one argument that a person can copy from a page."""
    return visible(text) != text or not fits_argument(text)


# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt; unicodedata has no such property):
# drawn as nothing whatever their category (Hangul fillers are letters, variation selectors marks), plus the blank
# braille pattern, a symbol drawn as a space
INVISIBLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
             (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800),
             (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
             (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))


def _unshown(char: str) -> bool:
    """A character a page would not show as itself, or that copying from it changes: controls, formatting
    (zero-width and bidirectional), surrogates, private and unassigned code points, spaces other than ' ', and
    whatever else Unicode draws as nothing (INVISIBLE)."""
    if char in KEPT or char == " ":
        return False
    code = ord(char)
    return (unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
            or any(low <= code <= high for low, high in INVISIBLE))


def _ansi_c_byte(byte: int) -> str:
    char = chr(byte)
    if char in "\\'":
        return "\\" + char
    return char if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


def ansi_c_quote(arg: str) -> str:
    """`arg` as bash's $'...': printable ASCII as it is, every other byte as \\xHH. The bytes are the argument's
    UTF-8, with a name's undecodable bytes (Python's surrogate escapes, U+DC80..U+DCFF) as the bytes they were, so
    the program receives exactly `arg` in any locale (bash's \\u escapes depend on it)."""
    try:
        data = arg.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: its code point's bytes, as written
        data = arg.encode("utf-8", "surrogatepass")
    return "$'" + "".join(_ansi_c_byte(byte) for byte in data) + "'"


def shown_command(command: str) -> str:
    """A shlex-quoted command as a page shows it: only characters a reader sees, and pasted into bash it runs the
    same argv. An argument with a character that would not show (a right-to-left override, a zero-width space,
    a non-breaking space that copying turns into a space) is ANSI-C quoted, so the page neither hides nor reorders
    a character and names the very file the command does; the others are shlex-quoted as in `command`."""
    return " ".join(ansi_c_quote(arg) if any(map(_unshown, arg)) else shlex.quote(arg)
                    for arg in shlex.split(command))


def literal(text) -> str:
    """`text` as a Markdown code span: Streamlit (st.error, st.markdown, ...) shows its characters as they are."""
    shown = " ".join(visible(str(text)).split()) or " "
    fence = "`" * (max((len(run) for run in re.findall(r"`+", shown)), default=0) + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


_MARKDOWN = re.compile(r"""[\\`*_\[\]<>#+!|~$&]|:(?=\S)""")
_AUTOLINK = re.compile(r"://|www\.|@|mailto:|xmpp:", re.IGNORECASE)


def plain(text) -> str:
    """A whole sentence for Streamlit's Markdown (st.error, st.info, labels): it shows exactly these characters.

    Every character that can start Markdown (links, images, emphasis, code, HTML, LaTeX `$`, Streamlit's
    `:red[...]` and `:material/...:`) is backslash-escaped. A word that GitHub-flavoured Markdown would turn into
    a link by itself (a URL, "www.", an e-mail address) goes into a code span instead: that autolinking runs on
    the text after escapes are resolved, so a backslash does not stop it. Whitespace runs become one space.
    """
    return " ".join(literal(word) if _AUTOLINK.search(word) else _MARKDOWN.sub(lambda m: "\\" + m.group(), word)
                    for word in visible(str(text)).split())


def link_int(params, name: str, notices: list[str]) -> int | None:
    """A whole number 0..LINK_INT_MAX from the link, or None with a notice (superscripts, 10**20, -1, "x")."""
    value = params.get(name)
    if value is None or value == "":
        return None
    number = int(value) if re.fullmatch(r"[0-9]{1,9}", value) else None  # not isdigit(): "²".isdigit() is True
    if number is None or not 0 <= number <= LINK_INT_MAX:
        notices.append(LINK_BAD_NUMBER.format(name=name, value=literal(value[:40]), max=LINK_INT_MAX))
        return None
    return number


def link_str(params, name: str, limit: int, notices: list[str]) -> str | None:
    value = params.get(name)
    if value is not None and len(value) > limit:
        notices.append(LINK_TOO_LONG.format(name=name, max=limit))
        return None
    return value


def link_choice(params, name: str, choices: tuple[str, ...], notices: list[str]) -> str | None:
    """One of `choices` from the link, or None (with a notice when the link gives another value)."""
    value = params.get(name)
    if value is None or value == "" or value in choices:
        return value or None
    notices.append(LINK_BAD_CHOICE.format(name=name, value=literal(value[:40]), choices=", ".join(choices)))
    return None


def link_switch(params, name: str, notices: list[str]) -> bool:
    """A switch from the link: on for "1", off for "0" or none; another value ("true", "yes") is off, with a notice."""
    value = params.get(name)
    if value not in (None, "", "0", "1"):
        notices.append(LINK_BAD_SWITCH.format(name=name, value=literal(value[:40])))
    return value == "1"


def link_score(params, probe: bool, notices: list[str]) -> str | None:
    """The atlas score from the link ("text:induction"; "probe:..." only with the probe on), or None."""
    value = params.get("score")
    if not value:
        return None
    source, _, name = value.partition(":")
    if name in HEAD_SCORE_NAMES and (source == "text" or source == "probe" and probe):
        return value
    notices.append(LINK_BAD_SCORE.format(value=literal(value[:40]), names=", ".join(HEAD_SCORE_NAMES)))
    return None


def parse_link(params) -> tuple[dict, list[str]]:
    """The app's link values: {"model", "layer", "head", "text", "query", "dtype", "score"} (None where absent or
    bad), the switches {"special_keys", "keep_bos", "keep_first", "probe", "long_text"} (True only for "1"; long_text:
    the link was made from a text too long for it) and the notices.

    `params` is st.query_params or any mapping of str to str. A bad value never reaches a widget: it is
    dropped and a notice (user text quoted with `literal`) says which one and why.
    """
    notices: list[str] = []
    settings = {"model": link_str(params, "model", LINK_MODEL_MAX, notices),
                "layer": link_int(params, "layer", notices), "head": link_int(params, "head", notices),
                "text": link_str(params, "text", LINK_TEXT_MAX, notices),
                "query": link_int(params, "query", notices),  # the query token's position (range: the app checks)
                "dtype": link_choice(params, "dtype", DTYPE_NAMES, notices),
                **{name: link_switch(params, name, notices) for name in ("special_keys", "keep_bos", "keep_first",
                                                                          "probe", "long_text")}}
    settings["score"] = link_score(params, settings["probe"], notices)
    if settings["model"] is not None and not settings["model"].strip():
        settings["model"] = None
    return settings, notices
