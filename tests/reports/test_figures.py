"""--figures: every chart of a run as a file for a paper, drawn by vl-convert (no browser), fonts embedded."""

from __future__ import annotations

import json
import re
import struct
import xml.etree.ElementTree as ET

import pytest

from analysis import analyze
from reports.__main__ import main
from reports.figures import COLUMN_PT, PPI, TEXT_PT, result_figures, write_figures
from tests.conftest import REPEATS

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def result(gpt2):
    return analyze(gpt2, REPEATS, layers=[6], keep_patterns=True)


@pytest.fixture(scope="module")
def svg_dir(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures-svg")
    write_figures(result, out, "svg", head=3)
    return out


def captions(folder) -> list[dict]:
    return json.loads((folder / "figures.json").read_text())["figures"]


def test_every_figure_is_written_and_named_by_layer_head_and_figure(result, svg_dir):
    names = sorted(p.name for p in svg_dir.iterdir())
    expected = [f"{stem}.svg" for stem, _, _, _ in result_figures(result, head=3)]
    assert sorted(expected + ["figures.json"]) == names
    assert len(expected) == len(result.head_scores) + 9  # the atlas, then the layer's nine charts
    assert "layer06_means.svg" in names and "layer06_head03_heatmap.svg" in names and "atlas_induction.svg" in names
    assert {c["file"] for c in captions(svg_dir)} == set(expected)
    means = next(c for c in captions(svg_dir) if c["figure"] == "means")
    assert means["layer"] == 6 and means["title"].startswith("Q and K means")  # the title moves to the caption


def test_sizes_fit_a_two_column_paper(svg_dir):
    for caption in captions(svg_dir):
        target = caption["width_pt"] / 72
        assert target in (COLUMN_PT / 72, TEXT_PT / 72)
        if caption["figure"] == "heatmap" or caption["figure"].startswith("atlas"):
            assert caption["width_in"] <= target + 0.02, caption
        else:
            assert abs(caption["width_in"] - target) <= 0.02, caption
        assert caption["height_in"] <= 9.0, caption  # fits on a page
        svg = ET.parse(svg_dir / caption["file"]).getroot()
        assert svg.get("width") == f"{float(svg.get('width')[:-2]):g}pt"
        assert abs(float(svg.get("width")[:-2]) / 72 - caption["width_in"]) < 0.01


def test_svg_figures_carry_their_font_and_draw_the_numbers(result, svg_dir):
    text = (svg_dir / "layer06_sink_mass.svg").read_text()
    face = r"@font-face \{ font-family: 'Liberation Sans'; font-weight: normal; src: url\(data:font/woff;base64,"
    assert re.search(face, text)
    root = ET.fromstring(text)
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "L6H0" in labels and "L6H11" in labels  # the axis names every head
    bars = root.findall(f".//{SVG}g[@class='mark-rect role-mark marks']/{SVG}path")
    assert len(bars) == result.model["n_heads"]
    heatmap = ET.parse(svg_dir / "layer06_head03_heatmap.svg").getroot()
    cells = heatmap.findall(f".//{SVG}g[@class='mark-rect role-mark marks']/{SVG}path")
    assert len(cells) == result.n_tokens ** 2


def test_pdf_embeds_its_fonts_and_png_is_300_ppi(result, tmp_path):
    pdf_dir, png_dir = tmp_path / "pdf", tmp_path / "png"
    write_figures(result, pdf_dir, "pdf")
    write_figures(result, png_dir, "png")
    for caption in captions(pdf_dir):
        pdf = (pdf_dir / caption["file"]).read_bytes()
        assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf, caption["file"]
        box = [float(v) for v in re.search(rb"/MediaBox\s*\[([^\]]*)\]", pdf)[1].split()]
        assert abs(box[2] / 72 - caption["width_in"]) < 0.02, caption["file"]
    for caption in captions(png_dir):
        png = (png_dir / caption["file"]).read_bytes()
        width, = struct.unpack(">I", png[16:20])
        assert abs(width / PPI - caption["width_in"]) < 0.02, caption["file"]
        phys = png.index(b"pHYs")
        assert struct.unpack(">II", png[phys + 4:phys + 12]) == (round(PPI / 0.0254),) * 2


def test_cli_figures_and_its_errors(gpt2_path, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["--model", str(gpt2_path), "--text", REPEATS, "--layer", "2", "--head", "1", "--figures", str(out),
                 "--format", "png"]) == 0
    assert (out / "layer02_head01_heatmap.png").exists() and (out / "atlas_sink.png").exists()
    assert str(out) in capsys.readouterr().err
    for argv, message in ((["--text", "x", "--json", "-", "--format", "svg"], "--format is the format of --figures"),
                          (["--text", "x", "--html", "r.html", "--shared-assets"], "--shared-assets shares"),
                          (["--text", "x", "--figures", "d", "--format", "gif"], "invalid choice: 'gif'")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_batch_figures_go_to_one_folder_per_text(gpt2_path, tmp_path, capsys):
    batch = tmp_path / "texts.txt"
    batch.write_text("The cat sat on the mat.\n   \nA dog ran home.\n")
    figures = tmp_path / "figs"
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(tmp_path / "out"), "--layer", "1",
                 "--figures", str(figures), "--format", "svg"]) == 0
    assert sorted(p.name for p in figures.iterdir()) == ["text-0001", "text-0002"]  # blank lines are no texts
    for folder in figures.iterdir():
        assert (folder / "layer01_means.svg").exists() and (folder / "layer01_head00_heatmap.svg").exists()
        assert len(captions(folder)) == len(list(folder.glob("*.svg")))
