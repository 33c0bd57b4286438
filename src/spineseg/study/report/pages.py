"""The report: the rendered notebooks as HTML without code, progress bars or warnings, with an index that
also links the threshold explorer, every table and the model card, in one folder that can be copied or served."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from spineseg import atomic
from spineseg.errors import StageOrderError
from spineseg.study.core.artifacts import NOTEBOOKS, Layout
from spineseg.study.core.config import load_profile
from spineseg.study.core.session import open_study, profile_path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # a live widget: in a page, tqdm's bar as plain text


def notebook_title(notebook) -> str:
    """The notebook's first Markdown heading ("05 · Analysis"), else its file's name."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return notebook.metadata.get("papermill", {}).get("input_path", "notebook")


def notebook_summary(notebook) -> str:
    """The first sentence of the notebook's introduction, as plain text: its line in the report's index."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            paragraphs = [p for p in cell.source.split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
            if paragraphs:
                text = re.sub(r"[*`]", "", " ".join(paragraphs[0].split()))
                return re.split(r"\. |: ", text)[0].rstrip(".") + "."
    return ""


def _is_console_noise(output) -> bool:
    """Progress bars and warnings: what the kernel wrote to stderr, and tqdm's widgets."""
    return (output.output_type == "stream" and output.name == "stderr") or WIDGET_VIEW in output.get("data", {})


def export_html(notebook: Path, target: Path, code: bool = True) -> Path:
    """An HTML copy of a rendered notebook that reads offline (no script from a CDN), titled by its heading;
    without code cells, for readers who only want the results, also without progress bars and warnings."""
    from importlib import resources

    import nbformat
    from nbconvert import HTMLExporter

    node = nbformat.read(notebook, as_version=4)
    node.metadata["title"] = notebook_title(node)
    if not code:
        for cell in node.cells:
            if cell.cell_type == "code":
                cell.outputs = [output for output in cell.outputs if not _is_console_noise(output)]
    templates = str(resources.files("spineseg").joinpath("resources/offline_html"))
    exporter = HTMLExporter(extra_template_paths=[templates], template_file="spineseg_offline.html.j2",
                            exclude_input=not code, exclude_input_prompt=not code, exclude_output_prompt=not code)
    body, _ = exporter.from_notebook_node(node)
    atomic.write_text(target, body)
    return target


def report_index(project: Path, profile: str, rendered: Sequence[Path], extras: Sequence[tuple[str, str, str]] = ()) -> str:
    """The report's front page: the profile and its description, each page in order with its one line, then the
    pages beside the notebooks (`extras`: file name, title, line)."""
    import nbformat

    description = load_profile(profile_path(project, profile)).description
    items = []
    for path in rendered:
        notebook = nbformat.read(path, as_version=4)
        items.append(_item(f"{path.stem}.html", notebook_title(notebook), notebook_summary(notebook)))
    also = "" if not extras else "<h2>Beside the notebooks</h2>\n<ul>\n" + "\n".join(_item(*extra) for extra in extras) + "\n</ul>\n"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>The study, profile '
            f"{html.escape(profile)}</title></head>\n<body>\n<h1>The study, profile <code>{html.escape(profile)}</code></h1>\n"
            f"<p>{html.escape(description)}</p>\n<ol>\n" + "\n".join(items) + "\n</ol>\n" + also + "</body>\n</html>\n")


def _item(href: str, title: str, line: str) -> str:
    return f'<li><a href="{html.escape(href)}">{html.escape(title)}</a> — {html.escape(line)}</li>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:0.85em;margin-bottom:2em}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _table_order(path: Path) -> tuple:
    """The article's tables by number first (table2 before table10), then the others by name."""
    number = re.fullmatch(r"table(\d+)(.*)", path.stem)
    return (0, int(number.group(1)), number.group(2)) if number else (1, 0, path.stem)


def tables_page(layout: Layout) -> str | None:
    """Every table the study wrote (its Markdown copy, caption included) on one page, saying where its CSV and
    LaTeX copies are; None before any table exists."""
    from nbconvert.filters.markdown import markdown2html

    tables = sorted(layout.tables_dir.glob("*.md"), key=_table_order)
    if not tables:
        return None
    sections = [f'<h2 id="{html.escape(path.stem)}">{html.escape(path.stem)}</h2>\n' + markdown2html(path.read_text())
                for path in tables]
    return _page(f"Tables of the study, profile {layout.profile}",
                 f"<h1>Tables, profile <code>{html.escape(layout.profile)}</code></h1>\n"
                 f"<p>Also as CSV and LaTeX in <code>runs/{html.escape(layout.run_dir.name)}/tables/</code>.</p>\n"
                 + "\n".join(sections))


def model_card_page(project: Path, profile: str) -> str | None:
    """The model card `spineseg export` would put in the bundle; None until stage 4 has chosen its rule (the
    index then has no link to it)."""
    from nbconvert.filters.markdown import markdown2html

    from spineseg.study.deployment import study_model_card

    try:
        card = study_model_card(open_study(profile, None, project))
    except StageOrderError:
        return None
    return _page(f"Model card, profile {profile}", markdown2html(card))


def write_report(project: Path, profile: str, out: Path | None = None, progress: bool = False) -> list[Path]:
    """``runs/<profile>/report/`` (or `out`): ``index.html``, the rendered notebooks as HTML without their code
    cells, the threshold explorer, the tables and the model card, each page self-contained, so the folder can be
    copied or served as it is. `progress`: a bar over the notebooks on stderr (each takes seconds)."""
    layout = Layout(Path(project).resolve(), profile)
    rendered = [layout.notebook(name) for name in NOTEBOOKS if layout.notebook(name).is_file()]
    if not rendered:
        raise StageOrderError(f"no rendered notebooks under {layout.notebooks_dir}: run `spineseg run --profile {profile}` first")
    page = layout.report if out is None else (lambda name: Path(out) / f"{name}.html")
    pages = [export_html(path, page(path.stem), code=False)
             for path in tqdm(rendered, desc="writing the report", unit="notebook", disable=not progress)]
    extras = []
    explorer = layout.figure("threshold_explorer", "html")
    if explorer.is_file():
        target = page("threshold_explorer")
        atomic.write_bytes(target, explorer.read_bytes())  # like every page of the report: whole or not at all
        pages.append(target)
        extras.append((target.name, "Threshold explorer", "every rule's DSC and three images' masks as T moves; "
                                                           "works offline"))
    for name, title, line, content in (
            ("tables", "Tables", "every table the study wrote, captions included", tables_page(layout)),
            ("model_card", "Model card", "what the ensemble is, how well it does on each test set, its limits",
             model_card_page(layout.project, profile))):
        if content is not None:
            atomic.write_text(page(name), content)
            extras.append((page(name).name, title, line))
            pages.append(page(name))
    index = page("index")
    atomic.write_text(index, report_index(layout.project, profile, rendered, extras))
    return [index, *pages]
