"""Figures a reader can publish: sized by what they show, saved at the profile's dpi, mask figures keyed."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from spineseg.ensemble import combine
from spineseg.metrics import dice
from spineseg.study.core.artifacts import Layout
from spineseg.study.core.config import Profile
from spineseg.study.core.session import Study
from spineseg.study.report import cases as cases_module
from spineseg.study.report import figures
from spineseg.study.report.tables import CANDIDATE_ORDER
from spineseg.study.stages.ensemble_inputs import EnsembleInputs


def _inputs(n: int = 5) -> EnsembleInputs:
    """Two members on n 32×32 images with a square of truth; member 0 gets it better on later images."""
    masks = np.zeros((n, 32, 32), dtype=np.uint8)
    masks[:, 10:20, 12:18] = 1
    probs = np.zeros((2, n, 32, 32), dtype=np.float32)
    for k in range(n):
        probs[0, k, 10:20, 12:12 + 1 + k] = 0.9
        probs[1, k, 8:20, 12:18] = 0.6
    images = np.random.default_rng(0).random((n, 32, 32)).astype(np.float32)
    return EnsembleInputs(names=["A", "B"], ids=[f"img{k}" for k in range(n)], patients=[f"p{k}" for k in range(n)],
                          probs=probs, masks=masks, images=images, labels=None, levels=[None, None],
                          val_dsc=np.array([0.8, 0.7]), threshold=0.5)


def test_dsc_boxplot_is_as_wide_as_the_models_it_shows():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"group": ["MobileNetV2", "ResNet34"] * 10, "dataset": ["d1"] * 10 + ["d2"] * 10,
                          "dsc": rng.random(20)})
    fig = figures.dsc_boxplot(frame, CANDIDATE_ORDER, "Stage-3 models")
    assert len(CANDIDATE_ORDER) > 30 and fig.get_figwidth() == 5.0  # two models, not the whole candidate list
    assert len(fig.axes) == 2 and fig.axes[0].get_position().y0 > fig.axes[1].get_position().y1  # datasets stacked
    many = pd.DataFrame({"group": CANDIDATE_ORDER, "dataset": "d1", "dsc": 0.5})
    assert figures.dsc_boxplot(many, CANDIDATE_ORDER, "all").get_figwidth() == figures.MAX_WIDTH_IN
    plt.close("all")


def test_a_saved_figure_has_the_profiles_dpi_and_its_size(tmp_path):
    study = Study(Profile.model_validate({"analysis": {"dpi": 120}}), Layout(tmp_path, "p"))
    fig = plt.figure(figsize=(4, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    png, pdf = figures.save(fig, study, "line")
    with Image.open(png) as image:
        assert np.allclose(image.info["dpi"], 120, atol=0.01)
        width, height = image.size
    assert 0.8 * 4 * 120 <= width <= 4 * 120 and 0.8 * 2 * 120 <= height <= 2 * 120  # tight: cropped, never grown
    assert pdf.read_bytes().startswith(b"%PDF")
    plt.close(fig)


def test_mask_figures_carry_their_colour_key_and_ranking_rule():
    inputs = _inputs()
    fig = figures.ensemble_overlays(inputs)
    keys = [legend for legend in fig.legends if legend.get_label() == "mask key"]
    assert len(keys) == 1  # added once, however many panels
    assert [text.get_text() for text in keys[0].get_texts()] == [*figures.MASK_KEY, "truth outline"]
    assert "ranked by soft voting DSC at T = 0.5" in fig._suptitle.get_text()
    picks = figures.ranked_picks(inputs)
    assert [fig.axes[5 * row].get_ylabel().split("\n")[0] for row in range(3)] == list(picks)
    assert fig.get_size_inches()[0] <= figures.PAGE_WIDTH_IN  # five rules side by side fit a journal page
    plt.close(fig)


def test_the_mask_colours_are_the_keys():
    image = np.full((1, 3), 0.5)
    pred, truth = np.array([[True, True, False]]), np.array([[True, False, True]])
    rgb = figures.error_rgb(image, pred, truth)
    tint = figures.TRUE_POSITIVE_TINT
    np.testing.assert_allclose(rgb[0, 0], (1 - tint) * 0.5 + tint * np.array(figures.TRUE_POSITIVE))
    np.testing.assert_allclose(rgb[0, 1], figures.FALSE_POSITIVE)
    np.testing.assert_allclose(rgb[0, 2], figures.FALSE_NEGATIVE)


def test_ranked_picks_follow_soft_voting_dsc():
    inputs = _inputs()
    dsc = dice(combine(inputs.probs, "soft", 0.5), inputs.masks)
    picks = figures.ranked_picks(inputs)
    assert dsc[picks["best"]] == dsc.max() and dsc[picks["worst"]] == dsc.min()


def test_worst_case_gallery_fits_a_page_however_many_members():
    inputs = _inputs(6)
    ten = EnsembleInputs(names=[f"member {k}" for k in range(10)], ids=inputs.ids, patients=inputs.patients,
                         probs=np.concatenate([inputs.probs] * 5), masks=inputs.masks, images=inputs.images,
                         labels=None, levels=[None] * 10, val_dsc=np.full(10, 0.8), threshold=0.5)
    cases = pd.DataFrame({"id": inputs.ids})
    fig = cases_module.worst_gallery(ten, cases)
    width, height = fig.get_size_inches()
    assert width <= figures.PAGE_WIDTH_IN and height <= figures.PAGE_HEIGHT_IN + 0.5
    titles = [ax.get_title() for ax in fig.axes[:4]]
    # image 0: member 0 covers one column of six (DSC 29 %), member 1 the square and two rows more (DSC 91 %)
    assert titles[0] == "best member\nmember 1\nDSC 91 %" and titles[1] == "worst member\nmember 0\nDSC 29 %"
    assert titles[2] == "Soft voting\nDSC 29 %"  # the mean reaches T only where all ten agree: column 12
    assert titles[3] == "members' disagreement"
    plt.close(fig)
