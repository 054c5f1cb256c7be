"""Figures for papers: every chart of a run as a PNG, SVG or PDF file, drawn by vl-convert (no browser).

The charts are the same Altair builders the app and the report use, resized for a two-column paper: most at one
column (3.35 in), the wide ones (strips of many points, heatmaps, the atlas) at the full text width (7 in), with
7-8 pt text. Titles move out of the figure into figures.json (a paper's caption says them); the figure keeps its
axes, legends and numbers. Fonts travel with the file: PDFs embed subsets of the fonts vl-convert used, SVGs
carry a subset of the font in an @font-face, PNGs are drawn at 300 pixels per inch.
"""

from __future__ import annotations

import base64
import copy
import functools
import html
import io
import json
import logging
import re
from pathlib import Path

from analysis.errors import HeadscopeError, OutputError
from analysis.results import AnalysisResult
from reports.charts import SCORE_TITLES, build_atlas_chart, build_layer_charts
from reports.choices import FORMATS

COLUMN_PT = 241  # one column of a two-column paper: 3.35 in (1 pt = 1/72 in)
TEXT_PT = 505  # both columns (a figure* in LaTeX): 7.0 in
WIDE = {"dot_products", "softmax", "heatmap"}  # figures drawn at the text width; the rest at one column
SQUARE = {"heatmap", "atlas"}  # grids of cells: sized by their cells, at most the target width
PPI = 300  # PNG resolution
FONT = "Liberation Sans"  # metric-compatible with Helvetica/Arial, as most paper templates use
FONT_FILES = {"normal": "LiberationSans-Regular.ttf", "bold": "LiberationSans-Bold.ttf"}
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts",
             Path.home() / ".local/share/fonts")
CONFIG = {
    "font": FONT,
    "axis": {"labelFontSize": 7, "titleFontSize": 8, "titleFontWeight": "normal"},
    "legend": {"labelFontSize": 7, "titleFontSize": 8, "orient": "bottom", "titleFontWeight": "normal"},
    "view": {"stroke": None},
}
FIGURE_HELP = "Download this figure as {fmt}, sized for a two-column paper (fonts embedded)"  # the app's buttons
NO_FONT = (f"No {FONT} font file to embed in SVG figures (looked under {', '.join(map(str, FONT_DIRS))}): install "
           "fonts-liberation, or use --format pdf or png.")


def figure_name(figure: str, layer: int | None = None, head: int | None = None) -> str:
    """File stem: layer06_means, layer06_head03_heatmap, atlas_induction."""
    parts = [f"layer{layer:02d}"] if layer is not None else []
    parts += [f"head{head:02d}"] if head is not None else []
    return "_".join(parts + [figure])


def _plain(title) -> tuple[str, list[str]]:
    if isinstance(title, dict):
        subtitle = title.get("subtitle") or []
        return str(title.get("text", "")), [subtitle] if isinstance(subtitle, str) else list(subtitle)
    return str(title or ""), []


def paper_spec(spec: dict, figure: str) -> tuple[dict, dict]:
    """A chart spec resized for a paper (title removed, plot sized to the column), and its caption."""
    spec = copy.deepcopy(spec)
    title, subtitle = _plain(spec.pop("title", ""))
    wide = figure in WIDE
    target = TEXT_PT if wide else COLUMN_PT
    width = target - (150 if wide else 75)  # leaves room for the y axis and its labels
    if figure in SQUARE:  # cells keep their shape; the figure may stay narrower than the target
        width = min(width, 330)
        height = round(width * spec.get("height", 1) / max(spec.get("width", 1), 1))
    else:
        height = int(width * (0.45 if wide else 0.62))
    spec["width"], spec["height"] = width, height
    spec["config"] = {**spec.get("config", {}), **CONFIG}
    return spec, {"title": title, "subtitle": subtitle, "width_pt": target}


def _svg_size(svg: str) -> tuple[float, float]:
    match = re.search(r'<svg[^>]*\swidth="([\d.]+)"[^>]*\sheight="([\d.]+)"', svg)
    return float(match[1]), float(match[2])


@functools.cache
def font_file(weight: str) -> Path | None:
    for folder in FONT_DIRS:
        if folder.is_dir():
            found = next(iter(sorted(folder.rglob(FONT_FILES[weight]))), None)
            if found is not None:
                return found
    return None


def _font_face(weight: str, text: str) -> str:
    """An @font-face rule carrying the font's glyphs for `text` (a subset, as WOFF, base64)."""
    from fontTools import subset
    from fontTools.ttLib import TTFont

    logging.getLogger("fontTools.subset").setLevel(logging.ERROR)  # "FFTM NOT subset": a timestamp table
    path = font_file(weight)
    if path is None:
        raise HeadscopeError(NO_FONT)
    font = TTFont(path)
    subsetter = subset.Subsetter(subset.Options())
    subsetter.populate(text=text + " ")
    subsetter.subset(font)
    font.flavor = "woff"
    out = io.BytesIO()
    font.save(out)
    data = base64.b64encode(out.getvalue()).decode()
    return (f"@font-face {{ font-family: '{FONT}'; font-weight: {weight}; "
            f"src: url(data:font/woff;base64,{data}) format('woff'); }}")


def embed_fonts(svg: str) -> str:
    """The SVG with a subset of its font embedded (every <text> keeps font-family FONT)."""
    texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]
    bold = [html.unescape(t) for t in re.findall(r'<text[^>]*font-weight="bold"[^>]*>([^<]*)</text>', svg)]
    faces = [_font_face("normal", "".join(texts))] + ([_font_face("bold", "".join(bold))] if bold else [])
    style = "<defs><style>" + " ".join(faces) + "</style></defs>"
    return re.sub(r"(<svg[^>]*>)", lambda m: m[1] + style, svg, count=1)


def render_figure(spec: dict, figure: str, fmt: str) -> tuple[bytes, dict]:
    """One figure as bytes in `fmt`, and its caption with its size in inches."""
    import vl_convert

    from reports.html import VEGA_LITE_VERSION

    if fmt not in FORMATS:
        raise HeadscopeError(f"Unknown figure format {fmt!r}: use one of {', '.join(FORMATS)}.")
    spec, caption = paper_spec(spec, figure)
    svg = vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION)
    slope, before = 1.0, None  # figure width per plot width (a quantitative axis may add ticks as it grows)
    for _ in range(5):  # widen or narrow the plot until the whole figure, axes included, is the target width
        width, height = _svg_size(svg)
        if abs(width - caption["width_pt"]) <= 1 or (figure in SQUARE and width <= caption["width_pt"]):
            break
        if before is not None and before[0] != spec["width"] and before[1] != width:
            slope = max(0.2, (width - before[1]) / (spec["width"] - before[0]))
        before = (spec["width"], width)
        ratio = spec["height"] / spec["width"]
        spec["width"] = max(40, round(spec["width"] + (caption["width_pt"] - width) / slope))
        if figure in SQUARE:
            spec["height"] = round(spec["width"] * ratio)
        svg = vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION)
    width, height = _svg_size(svg)  # 1 px of the chart = 1 pt on paper
    caption.update(width_in=round(width / 72, 3), height_in=round(height / 72, 3))
    if fmt == "svg":
        sized = re.sub(r'(<svg[^>]*?)\swidth="[\d.]+"\s+height="[\d.]+"',
                       lambda m: f'{m[1]} width="{width:g}pt" height="{height:g}pt"', svg, count=1)
        return embed_fonts(sized).encode(), caption
    if fmt == "pdf":
        return vl_convert.vegalite_to_pdf(spec, vl_version=VEGA_LITE_VERSION), caption
    return vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, ppi=PPI), caption


def result_figures(result: AnalysisResult, head: int = 0) -> list[tuple[str, str, object, dict]]:
    """(file stem, figure key, chart, where) for every chart of a run: the atlas, then each layer's charts."""
    figures = [(figure_name(f"atlas_{score}"), "atlas", build_atlas_chart(result, score),
                {"layer": None, "head": None, "figure": f"atlas_{score}", "score": SCORE_TITLES.get(score, score)})
               for score in result.head_scores]
    for layer in sorted(result.layers):
        for item in build_layer_charts(result, layer, head):
            which = head if item.key == "heatmap" else None
            figures.append((figure_name(item.key, layer, which), item.key, item.chart,
                            {"layer": layer, "head": which, "figure": item.key}))
    return figures


def write_figures(result: AnalysisResult, out_dir: Path, fmt: str = "pdf", head: int = 0) -> list[Path]:
    """Every figure of `result` into out_dir as `fmt` files, plus figures.json (captions and sizes)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create {out_dir}: {exc.strerror}.") from None
    written, captions = [], []
    for stem, key, chart, where in result_figures(result, head):
        data, caption = render_figure(chart.to_dict(), key, fmt)
        path = out_dir / f"{stem}.{fmt}"
        try:
            path.write_bytes(data)
        except OSError as exc:
            raise OutputError(f"Cannot write {path}: {exc.strerror}.") from None
        written.append(path)
        captions.append({"file": path.name, **where, **caption})
    try:
        (out_dir / "figures.json").write_text(json.dumps({"model": result.model["id"], "figures": captions},
                                                         indent=1), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"Cannot write {out_dir / 'figures.json'}: {exc.strerror}.") from None
    return written
