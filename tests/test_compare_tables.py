"""scripts/compare_tables.py: the byte-for-byte comparison of two runs' tables that a move of code is held to."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/compare_tables.py"
spec = importlib.util.spec_from_file_location("compare_tables", SCRIPT)
compare_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_tables)


def _tables(folder: Path, seconds: float, dsc: float) -> Path:
    folder.mkdir()
    (folder / "t.csv").write_text(f"group,DSC,seconds\nA,{dsc},{seconds}\n")
    (folder / "t.md").write_text(f"| A | {dsc} | {seconds} |\n")
    (folder / "u.csv").write_text("group,DSC\nB,1.0\n")
    return folder


def test_tables_that_differ_only_in_wall_clock_time_are_the_same(tmp_path):
    assert compare_tables.compare(_tables(tmp_path / "a", 1.5, 0.9), _tables(tmp_path / "b", 2.5, 0.9)) == []


def test_a_result_that_differs_is_named_with_its_column(tmp_path):
    problems = compare_tables.compare(_tables(tmp_path / "a", 1.5, 0.9), _tables(tmp_path / "b", 1.5, 0.8))
    assert problems == ["t.csv: differs in ['DSC']", "t.md: differs, and its CSV does not only in wall-clock columns"]
    (tmp_path / "b/u.csv").unlink()
    assert "u.csv: only in before" in compare_tables.compare(tmp_path / "a", tmp_path / "b")
