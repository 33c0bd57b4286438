"""Paired comparisons and confidence intervals over per-image metrics.

Every function takes the long "per-image metrics" frame: one row per
(group, run, dataset, id) with metric columns. A method evaluated with several
training runs contributes one value per image, the mean over its runs, so that
seeds do not pose as extra images. Where a dataset has several images of one
patient, the patient is the unit: paired tests compare per-patient means
(``pair_on=PATIENT_KEYS``) and intervals resample patients with all their
images (``cluster_on=PATIENT_KEYS``, a cluster bootstrap). With one image per
patient both give exactly the per-image results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy.stats import rankdata, wilcoxon
from statsmodels.stats.multitest import multipletests

FRACTION_METRICS = frozenset({"iou", "dsc", "recall", "specificity", "precision", "f1", "pa"})
LOWER_IS_BETTER = frozenset({"hd95", "assd"})
IMAGE_KEYS = ("dataset", "id")
PATIENT_KEYS = ("dataset", "patient")
NOT_SIGNIFICANT = "no significant difference"

# Differences are rounded before ranking: averaging runs in a different order
# leaves ~1e-17 noise that would turn true zeros into signed differences and
# split true ties into distinct ranks.
_DIFF_DECIMALS = 12
# Bootstrap index matrices are drawn in chunks of at most this many entries.
_BOOT_CHUNK_ENTRIES = 2_000_000

ALPHA = 0.05  # the significance level of every test the study reports


def _as_list(columns: str | Iterable[str]) -> list[str]:
    return [columns] if isinstance(columns, str) else list(columns)


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], role: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{role} column(s) missing from frame: {missing}")


def _require_groups(frame: pd.DataFrame, groups: Iterable[str]) -> None:
    present = set(frame["group"].unique())
    unknown = [g for g in groups if g not in present]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; frame has {sorted(map(str, present))}")


def _per_key_means(frame: pd.DataFrame, group: str, metric: str, keys: list[str]) -> pd.Series:
    rows = frame.loc[frame["group"] == group, [*keys, metric]]
    return rows.groupby(keys, sort=True)[metric].mean()


def _dataset_label(frame: pd.DataFrame) -> str | None:
    if "dataset" not in frame.columns:
        return None
    return "+".join(sorted(map(str, frame["dataset"].dropna().unique()))) or None


def _better(a: str, b: str, metric: str, median_diff: float, effect_size: float) -> str:
    """Name the better group: median difference first, rank-biserial to break a zero median."""
    direction = np.sign(median_diff) if median_diff != 0 else np.sign(effect_size)
    if not np.isfinite(direction) or direction == 0:
        return "no difference"
    if metric in LOWER_IS_BETTER:
        direction = -direction
    return a if direction > 0 else b


def _images_behind(frame: pd.DataFrame, group: str, keys: list[str], paired: pd.Index) -> int:
    """How many images the paired units hold (as many as units when the units are images)."""
    image_keys = [k for k in IMAGE_KEYS if k in frame.columns]
    if "id" not in image_keys or set(keys) <= set(image_keys):
        return len(paired)
    rows = frame.loc[frame["group"] == group, list(dict.fromkeys([*keys, *image_keys]))]
    inside = pd.MultiIndex.from_frame(rows[keys]).isin(paired) if len(keys) > 1 else rows[keys[0]].isin(paired)
    return int(rows.loc[inside, image_keys].drop_duplicates().shape[0])


def _paired_test(frame: pd.DataFrame, a: str, b: str, metric: str, keys: list[str], family: str) -> dict:
    paired = pd.concat(
        [_per_key_means(frame, a, metric, keys).rename("a"), _per_key_means(frame, b, metric, keys).rename("b")],
        axis=1,
        join="inner",
    ).dropna()
    values_a = paired["a"].to_numpy(dtype=float)
    values_b = paired["b"].to_numpy(dtype=float)
    diffs = np.round(values_a - values_b, _DIFF_DECIMALS)
    n = len(diffs)
    result = {
        "family": family,
        "dataset": _dataset_label(frame),
        "metric": metric,
        "a": a,
        "b": b,
        "n": n,
        "n_images": _images_behind(frame, a, keys, paired.index),
        "median_a": float(np.median(values_a)) if n else np.nan,
        "median_b": float(np.median(values_b)) if n else np.nan,
        "median_diff": float(np.median(diffs)) if n else np.nan,
        "statistic": np.nan,
        "p": np.nan,
        "effect_size": np.nan,
        "note": "",
    }
    nonzero = diffs[diffs != 0]
    if n < 2:
        result["note"] = f"only {n} paired image(s) for {a!r} vs {b!r}; test needs at least 2"
    elif nonzero.size == 0:
        result.update(statistic=0.0, p=1.0, effect_size=0.0, note="all paired differences are zero")
    else:
        ranks = rankdata(np.abs(nonzero))
        w_plus, w_minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
        test = wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided")
        result.update(
            statistic=float(test.statistic),
            p=float(test.pvalue),
            effect_size=float((w_plus - w_minus) / (w_plus + w_minus)),
        )
        if nonzero.size < n:
            result["note"] = f"{n - nonzero.size} zero difference(s) dropped"
    result["better"] = _better(a, b, metric, result["median_diff"], result["effect_size"])
    return result


def paired_wilcoxon(
    frame: pd.DataFrame,
    a: str,
    b: str,
    metric: str,
    pair_on: Sequence[str] = IMAGE_KEYS,
    family: str = "",
) -> dict:
    """Two-sided Wilcoxon signed-rank test of group `a` against group `b` on paired images.

    Rows are paired on `pair_on`; a group with several runs for one key enters
    as the mean over those runs, and keys that either group lacks (or has only
    NaN for) are left out, so `n` counts the images actually compared.

    zero_method="wilcox": zero differences are dropped before ranking (Wilcoxon's
    original rule), which keeps the test consistent with the effect size, the
    matched-pairs rank-biserial r = (W+ - W-) / (W+ + W-) over the nonzero
    differences; r > 0 means `a` scores higher. `statistic` is scipy's two-sided
    statistic, min(W+, W-). `median_diff` is the median of the paired
    differences a - b, not the difference of the medians. `better` names the
    group favoured by the median difference (by r when that is 0), counting
    lower as better for distance metrics (hd95, assd). All-zero differences
    give p = 1; fewer than 2 pairs give p = NaN; `note` says which.
    """
    keys = _as_list(pair_on)
    _require_columns(frame, ["group"], "group")
    _require_columns(frame, keys, "pair_on")
    _require_columns(frame, [metric], "metric")
    _require_groups(frame, [a, b])
    return _paired_test(frame, a, b, metric, keys, family)


def wilcoxon_family(
    frame: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str] = ("dsc", "iou"),
    *,
    family: str,
    pair_on: Sequence[str] = IMAGE_KEYS,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Test every pair on every metric and dataset, Holm-adjusting within each (dataset, metric).

    The family of hypotheses behind one table cell column is the set of pairs
    compared on one metric in one dataset, so that is where the multiplicity
    correction applies. Untestable rows (p NaN) keep p_holm NaN and do not
    count towards the family size. A group missing from one dataset gives an
    untestable row there rather than an error.
    """
    keys = _as_list(pair_on)
    metrics = _as_list(metrics)
    _require_columns(frame, ["group"], "group")
    _require_columns(frame, keys, "pair_on")
    _require_columns(frame, metrics, "metric")
    _require_groups(frame, [g for pair in pairs for g in pair])

    subsets = (
        [subset for _, subset in frame.groupby("dataset", sort=True)] if "dataset" in frame.columns else [frame]
    )
    rows = [
        _paired_test(subset, a, b, metric, keys, family)
        for subset in subsets
        for metric in metrics
        for a, b in pairs
    ]
    table = pd.DataFrame(rows)
    if table.empty:
        return table.assign(p_holm=pd.Series(dtype=float), significant=pd.Series(dtype=bool))

    table["p_holm"] = np.nan
    for _, cell in table.groupby(["dataset", "metric"], sort=False, dropna=False):
        testable = cell["p"].notna()
        if testable.any():
            adjusted = multipletests(cell.loc[testable, "p"].to_numpy(), alpha=alpha, method="holm")[1]
            table.loc[cell.index[testable], "p_holm"] = adjusted
    table["significant"] = table["p_holm"] < alpha
    return table


def holm_across(p: pd.Series) -> pd.Series:
    """Holm's adjustment over every testable p of a whole set of families: the secondary tests of a study taken
    as one family, so that no claim among them rests on the number of tests having been split into cells."""
    adjusted = pd.Series(np.nan, index=p.index)
    testable = p.notna()
    if testable.any():
        adjusted[testable] = multipletests(p[testable].to_numpy(), method="holm")[1]
    return adjusted


def all_pairs(groups: Iterable[str]) -> list[tuple[str, str]]:
    """Every unordered pair of distinct groups, in the order the groups were given."""
    return list(combinations(dict.fromkeys(groups), 2))


def one_vs_rest(reference: str, groups: Iterable[str]) -> list[tuple[str, str]]:
    """The reference against each other group, reference first so r > 0 favours it."""
    return [(reference, g) for g in dict.fromkeys(groups) if g != reference]


def bootstrap_ci(
    values: Iterable[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0, clusters: Iterable | None = None
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; NaNs are ignored.

    Without `clusters` the images are resampled. With `clusters` (one label per value, e.g. the
    patient) whole clusters are resampled with all their values, and each replicate is the mean
    over the values drawn: the interval of the same per-image mean, honest about correlated images.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    sample = np.asarray(values, dtype=float).ravel()
    labels = np.arange(sample.size) if clusters is None else np.asarray(list(clusters)).ravel()
    if labels.shape != sample.shape:
        raise ValueError(f"{labels.size} cluster labels for {sample.size} values")
    kept = ~np.isnan(sample)
    sample, labels = sample[kept], labels[kept]
    if sample.size == 0:
        return (np.nan, np.nan)
    cluster_of, _ = pd.factorize(labels)  # clusters in order of appearance: singletons replay the image bootstrap
    sums, counts = np.bincount(cluster_of, weights=sample), np.bincount(cluster_of).astype(float)
    n = sums.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ENTRIES // n)
    draws = (rng.integers(0, n, size=(min(chunk, n_boot - start), n)) for start in range(0, n_boot, chunk))
    means = np.concatenate([sums[d].sum(axis=1) / counts[d].sum(axis=1) for d in draws])
    tail = (1 - ci) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return (float(low), float(high))


def mean_ci_table(
    frame: pd.DataFrame,
    by: Sequence[str],
    metrics: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    image_on: Sequence[str] = IMAGE_KEYS,
    cluster_on: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean and bootstrap CI per group and metric, in the frame's own units.

    Each image (keys `image_on` within a `by` group) first becomes the mean of
    its runs, and the bootstrap resamples those images, or with `cluster_on`
    (e.g. PATIENT_KEYS) whole clusters of them; put "run" in `by` to get per-run
    intervals instead. `n` counts images and `n_clusters` the clusters resampled.
    Every cell uses the same seed, so the table is reproducible cell by cell.
    """
    by = _as_list(by)
    metrics = _as_list(metrics)
    image_keys = [k for k in _as_list(image_on) if k not in by]
    cluster_keys = [k for k in _as_list(cluster_on or image_on) if k not in by]
    _require_columns(frame, by, "by")
    _require_columns(frame, image_keys + cluster_keys, "image_on/cluster_on")
    _require_columns(frame, metrics, "metric")

    extra = [k for k in cluster_keys if k not in image_keys]
    per_image = frame.groupby(by + image_keys, sort=True).agg({**{m: "mean" for m in metrics}, **{k: "first" for k in extra}})
    rows = []
    for group_key, images in per_image.groupby(level=list(range(len(by))), sort=True):
        labels = dict(zip(by, group_key if isinstance(group_key, tuple) else (group_key,)))
        clusters = images.reset_index()[cluster_keys].astype(str).agg("\x1f".join, axis=1).to_numpy()
        for metric in metrics:
            values = images[metric].to_numpy(dtype=float)
            low, high = bootstrap_ci(values, n_boot=n_boot, ci=ci, seed=seed, clusters=clusters)
            present = ~np.isnan(values)
            rows.append(
                {
                    **labels,
                    "metric": metric,
                    "n": int(np.count_nonzero(present)),
                    "n_clusters": len(set(clusters[present])),
                    "mean": float(np.nanmean(values)) if present.any() else np.nan,
                    "low": low,
                    "high": high,
                }
            )
    return pd.DataFrame(rows, columns=[*by, "metric", "n", "n_clusters", "mean", "low", "high"])


def format_p(p: float) -> str:
    """Three decimals, or "<0.001", so tiny p-values do not read as exactly zero."""
    if not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _format_difference(value: float, metric: str) -> str:
    if not np.isfinite(value):
        return "n/a"
    if metric in FRACTION_METRICS:
        return f"{100 * value:+.2f} pp"
    if metric in LOWER_IS_BETTER:
        return f"{value:+.2f} px"
    return f"{value:+.4g}"


def format_wilcoxon(table: pd.DataFrame | dict) -> pd.DataFrame:
    """A report-ready copy of a wilcoxon_family/paired_wilcoxon table: strings, fraction differences in pp."""
    table = pd.DataFrame([table]) if isinstance(table, dict) else table
    readable = pd.DataFrame(
        {
            "family": table["family"],
            "dataset": table["dataset"],
            "metric": table["metric"],
            "a": table["a"],
            "b": table["b"],
            "n": table["n"],
            "n_images": table["n_images"],
            "median_diff": [_format_difference(v, m) for v, m in zip(table["median_diff"], table["metric"])],
            "effect_size": [f"{r:+.2f}" if np.isfinite(r) else "n/a" for r in table["effect_size"]],
            "p": [format_p(p) for p in table["p"]],
        },
        index=table.index,
    )
    if "p_holm" in table.columns:
        readable["p_holm"] = [format_p(p) for p in table["p_holm"]]
    if "p_holm_all" in table.columns:
        readable["p_holm_all"] = [format_p(p) for p in table["p_holm_all"]]
    if "p_holm" in table.columns:
        readable["significant"] = table["significant"].map({True: "yes", False: "no"})
        # a side is "better" only where the difference is significant
        readable["better"] = table["better"].where(table["significant"], NOT_SIGNIFICANT)
    else:
        readable["better"] = table["better"]
    if "note" in table.columns and table["note"].astype(bool).any():
        readable["note"] = table["note"]
    return readable


def auroc(scores: Iterable[float], positives: Iterable[bool]) -> float:
    """Area under the ROC curve of `scores` for flagging `positives` (ties count half): the
    Mann–Whitney U of the positives' scores against the negatives', divided by n₊·n₋."""
    scores = np.asarray(list(scores), dtype=float)
    positives = np.asarray(list(positives), dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
