"""`spineseg report`: the results without code, progress bars or warnings, titled pages and an index."""

import re
from html.parser import HTMLParser

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from spineseg.study.core.artifacts import NOTEBOOKS, Layout
from spineseg.study.report.pages import export_html, write_report


def _rendered(title: str, intro: str):
    """A notebook as papermill leaves it: a heading, a result, and what the kernel printed beside it."""
    cell = new_code_cell("run_stage2(study, data)", execution_count=1, outputs=[
        new_output("stream", name="stderr", text="stage2: 4 runs:  50%|#####     | 2/4\n"),
        new_output("stream", name="stderr", text="ConstantInputWarning: An input array is constant\n"),
        new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                                          "text/plain": "stage2: 4 runs:   0%|          | 0/4"}),
        new_output("stream", name="stdout", text="2 of 2 runs already finished: skipped\n"),
        new_output("display_data", data={"text/markdown": "**Table 2.** the result"}),
    ])
    return new_notebook(cells=[new_markdown_cell(f"# {title}\n\n{intro}"), cell])


def _project(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params/p.yaml").write_text('description: "tiny <b>data</b> & 2 epochs"\n')
    layout = Layout(tmp_path, "p")
    layout.notebooks_dir.mkdir(parents=True)
    for name in ("02_backbone_selection", "00_data"):
        title = f"{name[:2]} · {name[3:]}"
        nbformat.write(_rendered(title, f"What **{name}** does, in `short`. More detail here."), layout.notebook(name))
    return layout


def test_the_report_keeps_results_and_drops_progress_bars_and_warnings(tmp_path):
    layout = _project(tmp_path)
    index, *pages = write_report(tmp_path, "p")
    assert [page.stem for page in pages] == ["00_data", "02_backbone_selection"]  # the study's order
    page = pages[1].read_text()
    assert "the result" in page and "already finished" in page
    assert "%|" not in page and "ConstantInputWarning" not in page and "run_stage2" not in page
    assert re.search(r"<title>\s*02 · backbone_selection\s*</title>", page)
    rendered = layout.notebook("02_backbone_selection").read_text()
    assert "ConstantInputWarning" in rendered and "%|" in rendered  # the executed notebook keeps them


def test_the_index_links_the_pages_in_order_with_one_line_each_and_escapes_the_description(tmp_path):
    _project(tmp_path)
    index = write_report(tmp_path, "p")[0]
    assert index.name == "index.html"
    text = index.read_text()
    assert "tiny &lt;b&gt;data&lt;/b&gt; &amp; 2 epochs" in text and "<b>data" not in text
    items = re.findall(r'<li><a href="([^"]+)">([^<]+)</a> — ([^<]+)</li>', text)
    assert items == [("00_data.html", "00 · data", "What 00_data does, in short."),
                     ("02_backbone_selection.html", "02 · backbone_selection", "What 02_backbone_selection does, in short.")]


def test_the_report_goes_where_out_says_with_the_same_pages(tmp_path):
    _project(tmp_path)
    index, *pages = write_report(tmp_path, "p", tmp_path / "elsewhere")
    assert index == tmp_path / "elsewhere/index.html" and [page.parent for page in pages] == [tmp_path / "elsewhere"] * 2
    default = write_report(tmp_path, "p")
    assert [path.read_text() for path in default] == [index.read_text(), *(page.read_text() for page in pages)]


def test_the_html_copy_with_code_keeps_everything_and_is_titled(tmp_path):
    layout = _project(tmp_path)
    page = export_html(layout.notebook("00_data"), tmp_path / "00.html").read_text()
    assert "run_stage2" in page and "ConstantInputWarning" in page
    assert re.search(r"<title>\s*00 · data\s*</title>", page)


def test_every_study_notebook_has_a_heading_for_its_title_and_a_line_for_the_index():
    from pathlib import Path

    from spineseg.study.report.pages import notebook_summary, notebook_title

    folder = Path(__file__).resolve().parents[1] / "notebooks"
    for name in NOTEBOOKS:
        notebook = nbformat.read(folder / f"{name}.ipynb", as_version=4)
        assert notebook_title(notebook).startswith(name[:2] + " · "), name
        summary = notebook_summary(notebook)
        assert 20 < len(summary) < 400 and "\n" not in summary, (name, summary)


def test_the_index_links_the_explorer_and_every_table_in_the_articles_order(tmp_path):
    layout = _project(tmp_path)
    layout.tables_dir.mkdir(parents=True)
    for name in ("table10", "cases", "table2"):
        (layout.tables_dir / f"{name}.md").write_text(f"**{name} caption**\n\n| a |\n|--:|\n| 1 |\n")
    explorer = layout.figure("threshold_explorer", "html")
    explorer.parent.mkdir(parents=True)
    explorer.write_text("<html>the explorer</html>")
    index, *pages = write_report(tmp_path, "p", tmp_path / "out")
    assert [page.name for page in pages] == ["00_data.html", "02_backbone_selection.html", "threshold_explorer.html",
                                             "tables.html"]  # no model card before stage 4 has chosen
    assert (tmp_path / "out/threshold_explorer.html").read_text() == "<html>the explorer</html>"
    links = re.findall(r'<li><a href="([^"]+)">', index.read_text())
    assert links == ["00_data.html", "02_backbone_selection.html", "threshold_explorer.html", "tables.html"]
    tables = (tmp_path / "out/tables.html").read_text()
    assert tables.index("table2 caption") < tables.index("table10 caption") < tables.index("cases caption")
    assert "<table>" in tables and "<strong>table2 caption</strong>" in tables


def test_a_figure_carries_its_caption_as_alt_text_in_the_report(tmp_path):
    layout = _project(tmp_path)
    figure = new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "Figure x"},
                        metadata={"image/png": {"alt": 'Figure x: DSC "by" rule'}})
    notebook = nbformat.read(layout.notebook("00_data"), as_version=4)
    notebook.cells[1].outputs.append(figure)
    nbformat.write(notebook, layout.notebook("00_data"))
    page = write_report(tmp_path, "p")[1].read_text()
    images = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: images.append(dict(attrs)) if tag == "img" else None
    parser.feed(page)
    assert [image["alt"] for image in images] == ['Figure x: DSC "by" rule']
