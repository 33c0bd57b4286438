"""Are two runs' tables the same? Every file byte for byte, except the columns that measure wall-clock time,
which no two runs share: a CSV may differ there alone, and its Markdown and LaTeX copies with it.

    python scripts/compare_tables.py runs_before/smoke/tables runs_after/smoke/tables

Exits 0 when they are the same in that sense, 1 otherwise; prints what differs and where.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

WALL_CLOCK = ("seconds", "CPU ms", "ms_per_image", "process_peak_rss_mb")


def compare(before: Path, after: Path) -> list[str]:
    """What differs beyond wall-clock columns; empty when nothing does."""
    names = sorted({p.name for p in before.iterdir()} | {p.name for p in after.iterdir()})
    problems, timed = [], set()
    for name in names:
        a, b = before / name, after / name
        if not a.is_file() or not b.is_file():
            problems.append(f"{name}: only in {'after' if b.is_file() else 'before'}")
        elif a.read_bytes() != b.read_bytes():
            if a.suffix != ".csv":
                continue  # judged with its CSV below
            left, right = pd.read_csv(a), pd.read_csv(b)
            if list(left.columns) != list(right.columns) or left.shape != right.shape:
                problems.append(f"{name}: other columns or rows")
                continue
            columns = [c for c in left.columns if not left[c].equals(right[c])]
            if set(columns) - set(WALL_CLOCK):
                problems.append(f"{name}: differs in {sorted(set(columns) - set(WALL_CLOCK))}")
            else:
                timed.add(a.stem)
    for name in names:
        a, b = before / name, after / name
        if a.is_file() and b.is_file() and a.suffix != ".csv" and a.read_bytes() != b.read_bytes() and a.stem not in timed:
            problems.append(f"{name}: differs, and its CSV does not only in wall-clock columns")
    identical = sum((before / n).is_file() and (after / n).is_file() and (before / n).read_bytes() == (after / n).read_bytes()
                    for n in names)
    print(f"{identical} of {len(names)} files byte-identical; differing in wall-clock columns only: "
          f"{', '.join(sorted(timed)) or 'none'}")
    return problems


if __name__ == "__main__":
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) or "same tables")
    sys.exit(1 if found else 0)
