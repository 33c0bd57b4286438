from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from spineseg import stats
from spineseg.stats import (
    PATIENT_KEYS,
    all_pairs,
    bootstrap_ci,
    format_p,
    format_wilcoxon,
    holm_across,
    mean_ci_table,
    one_vs_rest,
    paired_wilcoxon,
    wilcoxon_family,
)

# Differences whose absolute ranks are 1..5; which ones are negative sets W- by hand.
FIVE_DIFFS = [0.10, 0.20, -0.05, 0.30, 0.40]


def metrics_frame(values_by_group: dict[str, list[float]], metric: str = "dsc", dataset: str = "d1", run=0):
    rows = [
        {"group": group, "run": run, "dataset": dataset, "id": f"img{i}", metric: value}
        for group, values in values_by_group.items()
        for i, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def against_baseline(diffs: list[float], base: float = 0.5) -> pd.DataFrame:
    return metrics_frame({"A": [base + d for d in diffs], "B": [base] * len(diffs)})


def test_hand_computed_five_pairs():
    # |d| ranks: 0.05->1, 0.10->2, 0.20->3, 0.30->4, 0.40->5; only rank 1 is negative.
    # W+ = 14, W- = 1, r = 13/15; exact two-sided p = 2 * P(W <= 1) = 2 * 2/32.
    result = paired_wilcoxon(against_baseline(FIVE_DIFFS), "A", "B", "dsc", family="enc")
    assert result["n"] == 5
    assert result["statistic"] == 1.0
    assert result["p"] == pytest.approx(0.125)
    assert result["effect_size"] == pytest.approx(13 / 15)
    assert result["median_a"] == pytest.approx(0.7)
    assert result["median_b"] == pytest.approx(0.5)
    assert result["median_diff"] == pytest.approx(0.2)
    assert result["better"] == "A"
    assert (result["family"], result["dataset"], result["metric"], result["a"], result["b"]) == (
        "enc", "d1", "dsc", "A", "B",
    )
    assert result["note"] == ""


def test_effect_size_is_one_when_a_wins_every_pair():
    result = paired_wilcoxon(against_baseline([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]), "A", "B", "dsc")
    assert result["effect_size"] == 1.0
    assert result["statistic"] == 0.0
    assert result["p"] == pytest.approx(2 / 2**6)
    assert result["better"] == "A"


def test_swapping_groups_flips_signs_and_winner():
    frame = against_baseline(FIVE_DIFFS)
    forward = paired_wilcoxon(frame, "A", "B", "dsc")
    backward = paired_wilcoxon(frame, "B", "A", "dsc")
    assert backward["effect_size"] == pytest.approx(-forward["effect_size"])
    assert backward["median_diff"] == pytest.approx(-forward["median_diff"])
    assert (backward["median_a"], backward["median_b"]) == (forward["median_b"], forward["median_a"])
    assert backward["p"] == pytest.approx(forward["p"])
    assert backward["statistic"] == forward["statistic"]
    assert (forward["better"], backward["better"]) == ("A", "A")


def test_zero_median_difference_falls_back_to_effect_size():
    # Median difference is 0 but the positive differences carry the larger ranks.
    result = paired_wilcoxon(against_baseline([-0.01, -0.02, 0.0, 0.3, 0.4]), "A", "B", "dsc")
    assert result["median_diff"] == 0.0
    assert result["effect_size"] > 0
    assert result["better"] == "A"
    assert "1 zero difference" in result["note"]


def test_lower_is_better_for_distance_metrics():
    frame = metrics_frame({"A": [5.0, 6.0, 7.0, 8.0], "B": [3.0, 4.0, 5.0, 6.5]}, metric="hd95")
    result = paired_wilcoxon(frame, "A", "B", "hd95")
    assert result["effect_size"] == 1.0
    assert result["better"] == "B"


def test_identical_groups_give_p_one_without_warnings():
    values = [0.81, 0.92, 0.77, 0.85]
    frame = metrics_frame({"A": values, "B": values})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = paired_wilcoxon(frame, "A", "B", "dsc")
    assert result["p"] == 1.0
    assert result["effect_size"] == 0.0
    assert result["better"] == "no difference"
    assert "zero" in result["note"]


def test_float_noise_from_run_averaging_counts_as_zero():
    # 0.1 + 0.2 averaged over runs is not bit-equal to 0.3, yet the images are tied.
    frame = pd.concat(
        [
            metrics_frame({"A": [0.1, 0.7, 0.4]}, run=0),
            metrics_frame({"A": [0.2, 0.1, 0.5]}, run=1),
            metrics_frame({"B": [0.15, 0.4, 0.45]}),
        ]
    )
    result = paired_wilcoxon(frame, "A", "B", "dsc")
    assert result["p"] == 1.0
    assert result["note"] == "all paired differences are zero"


def test_fewer_than_two_pairs_gives_nan_p_with_note():
    frame = metrics_frame({"A": [0.9], "B": [0.8]})
    result = paired_wilcoxon(frame, "A", "B", "dsc")
    assert result["n"] == 1
    assert math.isnan(result["p"])
    assert "at least 2" in result["note"]


def test_pairing_survives_shuffled_rows():
    frame = against_baseline(FIVE_DIFFS)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert paired_wilcoxon(shuffled, "A", "B", "dsc") == paired_wilcoxon(frame, "A", "B", "dsc")


def test_only_common_images_are_paired():
    frame = against_baseline(FIVE_DIFFS)
    frame = frame[~((frame["group"] == "B") & (frame["id"] == "img2"))]  # drops the one negative difference
    result = paired_wilcoxon(frame, "A", "B", "dsc")
    assert result["n"] == 4
    assert result["effect_size"] == 1.0


def test_nan_metric_drops_the_pair():
    frame = against_baseline(FIVE_DIFFS)
    frame.loc[(frame["group"] == "A") & (frame["id"] == "img2"), "dsc"] = np.nan
    assert paired_wilcoxon(frame, "A", "B", "dsc")["n"] == 4


def test_runs_are_averaged_per_image():
    single = against_baseline(FIVE_DIFFS)
    spread = single[single["group"] == "A"].assign(dsc=lambda f: f["dsc"] - 0.01, run=1)
    spread_back = single[single["group"] == "A"].assign(dsc=lambda f: f["dsc"] + 0.01, run=2)
    two_runs = pd.concat([spread, spread_back, single[single["group"] == "B"]])
    averaged = paired_wilcoxon(two_runs, "A", "B", "dsc")
    reference = paired_wilcoxon(single, "A", "B", "dsc")
    assert averaged["n"] == 5
    for key in ("statistic", "p", "effect_size", "median_diff"):
        assert averaged[key] == pytest.approx(reference[key])


def test_same_id_in_two_datasets_is_not_conflated():
    frame = pd.concat(
        [
            metrics_frame({"A": [0.9, 0.8, 0.7], "B": [0.5, 0.5, 0.5]}, dataset="d1"),
            metrics_frame({"A": [0.1, 0.2, 0.3], "B": [0.5, 0.5, 0.5]}, dataset="d2"),
        ]
    )
    result = paired_wilcoxon(frame, "A", "B", "dsc")
    assert result["n"] == 6
    assert result["dataset"] == "d1+d2"
    only_d1 = paired_wilcoxon(frame[frame["dataset"] == "d1"], "A", "B", "dsc")
    assert (only_d1["n"], only_d1["effect_size"], only_d1["dataset"]) == (3, 1.0, "d1")


def test_unknown_group_raises_naming_it():
    with pytest.raises(ValueError, match="Nope"):
        paired_wilcoxon(against_baseline(FIVE_DIFFS), "A", "Nope", "dsc")


def test_missing_metric_column_raises_naming_it():
    with pytest.raises(ValueError, match="hd95"):
        paired_wilcoxon(against_baseline(FIVE_DIFFS), "A", "B", "hd95")


def test_missing_pair_on_column_raises_naming_it():
    with pytest.raises(ValueError, match="patient"):
        paired_wilcoxon(against_baseline(FIVE_DIFFS), "A", "B", "dsc", pair_on=("dataset", "patient"))


def test_family_rejects_unknown_group_and_missing_metric():
    frame = against_baseline(FIVE_DIFFS)
    with pytest.raises(ValueError, match="Ghost"):
        wilcoxon_family(frame, [("A", "Ghost")], metrics=("dsc",), family="f")
    with pytest.raises(ValueError, match="iou"):
        wilcoxon_family(frame, [("A", "B")], metrics=("dsc", "iou"), family="f")


def holm_frame() -> pd.DataFrame:
    """Reference R against X, Y, Z with exact p-values 1/16, 2/16 and 3/16 (n = 5)."""
    ups = [0.1, 0.2, 0.3, 0.4, 0.5]
    return metrics_frame(
        {
            "R": [0.2] * 5,
            "X": [0.2 + d for d in ups],
            "Y": [0.2 + d * s for d, s in zip(ups, [-1, 1, 1, 1, 1])],
            "Z": [0.2 + d * s for d, s in zip(ups, [1, -1, 1, 1, 1])],
        }
    )


def test_holm_on_hand_computed_p_values():
    table = wilcoxon_family(holm_frame(), one_vs_rest("R", ["R", "X", "Y", "Z"]), metrics=("dsc",), family="f")
    assert table["p"].tolist() == pytest.approx([1 / 16, 2 / 16, 3 / 16])
    # Holm: sorted p times (3, 2, 1), made monotone: 3/16, max(4/16, 3/16), max(4/16, 3/16).
    assert table["p_holm"].tolist() == pytest.approx([3 / 16, 4 / 16, 4 / 16])
    assert table["p_holm"].tolist() == pytest.approx(multipletests(table["p"], method="holm")[1].tolist())
    assert (table["p_holm"] >= table["p"]).all()
    assert not table["significant"].any()
    assert (table["better"] == ["X", "Y", "Z"]).all()


def random_family_frame(seed: int = 1, n_images: int = 25) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shifts = {"unet": 0.0, "fpn": 0.01, "ens": 0.03, "deeplab": -0.02}
    frames = []
    for dataset in ("d1", "d2"):
        base = rng.uniform(0.6, 0.9, n_images)
        for group, shift in shifts.items():
            for run in range(2):
                noise = rng.normal(0, 0.02, n_images)
                frames.append(
                    pd.DataFrame(
                        {
                            "group": group,
                            "run": run,
                            "dataset": dataset,
                            "id": np.arange(n_images),
                            "dsc": np.clip(base + shift + noise, 0, 1),
                            "iou": np.clip(base + shift + noise - 0.1, 0, 1),
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def test_family_applies_holm_within_each_dataset_and_metric():
    pairs = one_vs_rest("ens", ["unet", "fpn", "ens", "deeplab"])
    table = wilcoxon_family(random_family_frame(), pairs, metrics=("dsc", "iou"), family="enc")
    assert len(table) == 3 * 2 * 2
    assert set(table["family"]) == {"enc"}
    assert set(zip(table["dataset"], table["metric"])) == {(d, m) for d in ("d1", "d2") for m in ("dsc", "iou")}
    for _, cell in table.groupby(["dataset", "metric"]):
        assert len(cell) == 3
        assert list(zip(cell["a"], cell["b"])) == pairs
        expected = multipletests(cell["p"], method="holm")[1]
        assert cell["p_holm"].to_numpy() == pytest.approx(expected)
        assert (cell["p_holm"] >= cell["p"] - 1e-15).all()
        assert (cell["significant"] == (cell["p_holm"] < 0.05)).all()
    over_all_twelve = multipletests(table["p"], method="holm")[1]
    assert not np.allclose(over_all_twelve, table["p_holm"])
    assert (table["n"] == 25).all()


def test_holm_across_adjusts_every_testable_p_of_all_families_at_once():
    p = pd.Series([0.01, np.nan, 0.04, 0.03, 0.2])
    adjusted = holm_across(p)
    assert adjusted.tolist()[0] == pytest.approx(0.04) and np.isnan(adjusted[1])  # 4 testable: 0.01 × 4
    assert adjusted[[0, 2, 3, 4]].tolist() == pytest.approx(multipletests([0.01, 0.04, 0.03, 0.2], method="holm")[1].tolist())
    assert holm_across(pd.Series([np.nan, np.nan])).isna().all()


def test_family_marks_group_absent_from_a_dataset_as_untestable():
    frame = random_family_frame(n_images=8)
    frame = frame[~((frame["group"] == "fpn") & (frame["dataset"] == "d2"))]
    table = wilcoxon_family(frame, [("ens", "fpn"), ("ens", "unet")], metrics=("dsc",), family="f", alpha=0.5)
    missing = table[(table["dataset"] == "d2") & (table["b"] == "fpn")].iloc[0]
    assert missing["n"] == 0 and math.isnan(missing["p"]) and math.isnan(missing["p_holm"])
    assert not missing["significant"]
    alone = table[(table["dataset"] == "d2") & (table["b"] == "unet")].iloc[0]
    assert alone["p_holm"] == pytest.approx(alone["p"])  # a family of one testable hypothesis


def test_all_pairs_and_one_vs_rest():
    assert all_pairs(["a", "b", "c", "b"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert all_pairs(["only"]) == []
    assert one_vs_rest("b", ["a", "b", "c"]) == [("b", "a"), ("b", "c")]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1, allow_nan=False), st.floats(0, 1, allow_nan=False)), min_size=2, max_size=20
    )
)
def test_swap_symmetry_property(pairs):
    frame = metrics_frame({"A": [p[0] for p in pairs], "B": [p[1] for p in pairs]})
    forward = paired_wilcoxon(frame, "A", "B", "dsc")
    backward = paired_wilcoxon(frame, "B", "A", "dsc")
    assert -1 <= forward["effect_size"] <= 1
    assert backward["effect_size"] == pytest.approx(-forward["effect_size"])
    assert backward["p"] == pytest.approx(forward["p"])
    assert 0 <= forward["p"] <= 1


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(0).normal(0.8, 0.05, 40)
    low, high = bootstrap_ci(values, n_boot=1000, seed=7)
    assert low < values.mean() < high
    assert bootstrap_ci(values, n_boot=1000, seed=7) == (low, high)
    assert bootstrap_ci(values, n_boot=1000, seed=8) != (low, high)


def test_bootstrap_ci_narrows_with_more_images():
    rng = np.random.default_rng(1)
    widths = [np.diff(bootstrap_ci(rng.normal(0, 1, n), n_boot=1000))[0] for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_ci_ignores_nans_and_handles_tiny_samples():
    assert bootstrap_ci([0.2, np.nan, 0.4, 0.6], seed=3) == bootstrap_ci([0.2, 0.4, 0.6], seed=3)
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))


def test_bootstrap_ci_chunking_does_not_change_the_result(monkeypatch):
    values = np.random.default_rng(2).uniform(size=50)
    whole = bootstrap_ci(values, n_boot=300, seed=4)
    monkeypatch.setattr(stats, "_BOOT_CHUNK_ENTRIES", 50 * 7)  # 7 resamples per chunk, ragged last chunk
    assert bootstrap_ci(values, n_boot=300, seed=4) == whole


def test_bootstrap_ci_rejects_bad_parameters():
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci([1.0, 2.0], ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


def test_bootstrap_ci_coverage_on_normal_samples():
    rng = np.random.default_rng(2024)
    true_mean = 0.75
    hits = 0
    for seed in range(200):
        low, high = bootstrap_ci(rng.normal(true_mean, 0.1, 30), n_boot=500, seed=seed)
        hits += low <= true_mean <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_mean_ci_table_averages_runs_per_image_before_bootstrapping():
    frame = random_family_frame(n_images=12)
    table = mean_ci_table(frame, by=["dataset", "group"], metrics=["dsc", "iou"], n_boot=400, seed=5)
    assert list(table.columns) == ["dataset", "group", "metric", "n", "n_clusters", "mean", "low", "high"]
    assert len(table) == 2 * 4 * 2
    assert (table["n"] == 12).all()  # images, not image x run rows
    assert ((table["low"] <= table["mean"]) & (table["mean"] <= table["high"])).all()

    row = table[(table["dataset"] == "d2") & (table["group"] == "fpn") & (table["metric"] == "iou")].iloc[0]
    subset = frame[(frame["dataset"] == "d2") & (frame["group"] == "fpn")]
    per_image = subset.groupby("id")["iou"].mean()
    assert row["mean"] == pytest.approx(per_image.mean())
    assert (row["low"], row["high"]) == pytest.approx(bootstrap_ci(per_image.to_numpy(), n_boot=400, seed=5))


def test_mean_ci_table_per_run_when_run_is_in_by():
    frame = random_family_frame(n_images=6)
    table = mean_ci_table(frame, by=["group", "run"], metrics=["dsc"], n_boot=100, seed=0)
    assert len(table) == 4 * 2
    assert (table["n"] == 12).all()  # 6 images in each of 2 datasets


def test_mean_ci_table_rejects_missing_columns():
    frame = random_family_frame(n_images=4)
    with pytest.raises(ValueError, match="pa"):
        mean_ci_table(frame, by=["group"], metrics=["dsc", "pa"], n_boot=10)
    with pytest.raises(ValueError, match="encoder"):
        mean_ci_table(frame, by=["encoder"], metrics=["dsc"], n_boot=10)


@pytest.mark.parametrize(
    ("p", "text"), [(0.0004, "<0.001"), (0.001, "0.001"), (0.0341, "0.034"), (1.0, "1.000"), (np.nan, "n/a")]
)
def test_format_p(p, text):
    assert format_p(p) == text


def test_format_wilcoxon_reads_well():
    frame = pd.concat(
        [
            against_baseline(FIVE_DIFFS),
            metrics_frame({"A": [5.0, 6.0, 7.0, 8.0, 9.0], "B": [3.0, 4.0, 5.0, 6.5, 8.5]}, metric="hd95"),
        ]
    )
    table = wilcoxon_family(frame, [("A", "B")], metrics=("dsc", "hd95"), family="f")
    readable = format_wilcoxon(table).set_index("metric")
    assert readable.loc["dsc", "median_diff"] == "+20.00 pp"
    assert readable.loc["dsc", "effect_size"] == "+0.87"
    assert readable.loc["dsc", "p"] == "0.125"
    assert readable.loc["dsc", "p_holm"] == "0.125"
    assert readable.loc["dsc", "significant"] == "no"
    assert readable.loc["dsc", "better"] == "no significant difference"  # A leads, but not significantly
    assert table.set_index("metric").loc["dsc", "better"] == "A"  # the raw table keeps the direction
    assert readable.loc["hd95", "median_diff"] == "+2.00 px"
    assert table.set_index("metric").loc["hd95", "better"] == "B"
    assert "note" not in readable.columns


def test_format_wilcoxon_accepts_a_single_result():
    result = paired_wilcoxon(metrics_frame({"A": [0.9], "B": [0.8]}), "A", "B", "dsc")
    readable = format_wilcoxon(result)
    assert readable.loc[0, "p"] == "n/a"
    assert "at least 2" in readable.loc[0, "note"]
    assert "p_holm" not in readable.columns


def test_a_cluster_bootstrap_of_one_image_clusters_is_the_image_bootstrap():
    values = np.random.default_rng(1).random(40)
    assert bootstrap_ci(values, seed=3, clusters=[f"p{i}" for i in range(40)]) == bootstrap_ci(values, seed=3)


def test_patients_with_many_alike_images_widen_the_interval():
    rng = np.random.default_rng(2)
    level = rng.normal(0.8, 0.1, 10)  # ten patients, seven near-identical images each
    values = np.repeat(level, 7) + rng.normal(0, 0.005, 70)
    patients = np.repeat(np.arange(10), 7)
    naive = np.diff(bootstrap_ci(values, seed=0))[0]
    clustered = np.diff(bootstrap_ci(values, seed=0, clusters=patients))[0]
    assert clustered > 2 * naive
    low, high = bootstrap_ci(values, seed=0, clusters=patients)
    assert low < values.mean() < high


def test_paired_tests_by_patient_use_patient_means_and_count_both():
    rows = []
    for patient in range(6):
        for image in range(3):  # a patient's three images move together
            a = 0.7 + 0.02 * patient + 0.001 * image
            rows += [("A", 0, "d1", f"p{patient}i{image}", f"p{patient}", a),
                     ("B", 0, "d1", f"p{patient}i{image}", f"p{patient}", a - 0.01 * (patient + 1))]
    frame = pd.DataFrame(rows, columns=["group", "run", "dataset", "id", "patient", "dsc"])
    by_image = paired_wilcoxon(frame, "A", "B", "dsc")
    by_patient = paired_wilcoxon(frame, "A", "B", "dsc", pair_on=PATIENT_KEYS)
    assert (by_image["n"], by_image["n_images"]) == (18, 18)
    assert (by_patient["n"], by_patient["n_images"]) == (6, 18)
    assert by_patient["p"] > by_image["p"]  # six independent units are weaker evidence than 18 "independent" images


def test_format_wilcoxon_names_the_better_side_when_significant():
    rng = np.random.default_rng(4)
    base = rng.random(30)
    frame = metrics_frame({"A": list(base + 0.1), "B": list(base)})
    readable = format_wilcoxon(wilcoxon_family(frame, [("A", "B")], metrics=("dsc",), family="f"))
    assert readable.loc[0, "significant"] == "yes" and readable.loc[0, "better"] == "A"


def test_auroc_on_constructed_scores():
    from spineseg.stats import auroc

    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5  # ties count half
    assert np.isnan(auroc([0.1, 0.2], [True, True]))  # nothing to tell apart
    rng = np.random.default_rng(0)
    positives = rng.random(2000) < 0.3
    scores = rng.normal(positives * 1.0, 1.0)
    from scipy.stats import norm
    assert auroc(scores, positives) == pytest.approx(norm.cdf(1 / np.sqrt(2)), abs=0.03)  # binormal, d' = 1
