"""Where this study differs from the article, and why: said in 05_analysis with this run's own figures.

The README's section of the same name says the same in general; here the counts come from the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from spineseg.study.core.artifacts import read_table
from spineseg.study.core.records import Selection
from spineseg.study.core.session import Study
from spineseg.study.report.article import published


@dataclass(frozen=True)
class Setting:
    """How one training stage was run: what a table's numbers come from, beside the article's."""

    data: str
    weights: str
    max_epochs: int | None  # None: not stated
    image_size: tuple[int, int]
    trainings: str

    def __str__(self) -> str:
        epochs = "epochs not stated" if self.max_epochs is None else f"≤ {self.max_epochs} epochs"
        size = "×".join(str(side) for side in self.image_size)
        return f"{self.data}, {self.weights}, {epochs} at {size}, {self.trainings}"


ARTICLE_DATA = "CheXpert and VinDr-SpineXR radiographs"
DATA_SOURCES = {"synthetic": "synthetic radiographs", "aasce": "AASCE/BoostNet spinal X-rays",
                "folder": "the profile's own images"}
WEIGHTS = {"imagenet": "ImageNet weights", "none": "from scratch"}
ARTICLE_SETTINGS = {
    "stage1": Setting(ARTICLE_DATA, "weights not stated", 100, (256, 256), "50 trainings per arm"),
    "stage2": Setting(ARTICLE_DATA, "ImageNet weights", 300, (256, 256), "20 encoders × 10 trainings"),
    "stage3": Setting(ARTICLE_DATA, "ImageNet weights", None, (512, 512), "the 10 selected encoders"),
}


def _stage2_weights(study: Study) -> str:
    """What the candidates started from: one of `WEIGHTS`, or ImageNet for some encoders and nothing for the rest."""
    s2 = study.cfg.stage2
    pretrained = [encoder for encoder in s2.encoders if s2.weights_of(encoder) == "imagenet"]
    if len(pretrained) in (0, len(s2.encoders)):
        return WEIGHTS["imagenet" if pretrained else "none"]
    return f"{WEIGHTS['imagenet']} for {', '.join(pretrained)}, the others {WEIGHTS['none']}"


def run_setting(study: Study, stage: str) -> Setting:
    """This run's data, weights, epochs, input size and trainings in a training stage (stage1–stage3)."""
    cfg = study.cfg
    data = DATA_SOURCES[cfg.data.source]
    if stage == "stage1":
        return Setting(data, WEIGHTS[cfg.stage1.pretrained], cfg.stage1.max_epochs, cfg.stage1.image_size,
                       f"{cfg.stage1.repeats} training(s) per arm")
    if stage == "stage2":
        candidates = len(cfg.stage2.encoders) * len(cfg.stage2.targets)
        return Setting(data, _stage2_weights(study), cfg.stage2.max_epochs, cfg.stage2.image_size,
                       f"{candidates} candidate(s) × {cfg.stage2.repeats} training(s)")
    selection = study.layout.selection
    selected = len(Selection.load(selection).candidates) if selection.is_file() else 0
    weights = _stage2_weights(study) + (", continued from stage 2" if cfg.stage3.init_from == "stage2" else "")
    return Setting(data, weights, cfg.stage3.max_epochs, cfg.stage3.image_size, f"the {selected} selected model(s)")


def against_article(study: Study, stage: str) -> str:
    """One caption's clause: this run's setting of a training stage, and the article's."""
    return f"this run: {run_setting(study, stage)} (article: {ARTICLE_SETTINGS[stage]})"


def _rule_checks(study: Study) -> pd.DataFrame | None:
    path = study.layout.rule_checks
    return read_table(path) if path.is_file() else None


def _empty_members(checks: pd.DataFrame | None) -> str:
    if checks is None:
        return "(stage 4 has not run)"
    return "; ".join(f"{row.dataset}: {row.images_with_an_empty_member} of {row.images} images"
                     for row in checks.itertuples())


def _max_vs_union(checks: pd.DataFrame | None) -> str:
    if checks is None or "images_where_max_differs_from_union" not in checks:
        return ""
    differing = int(checks["images_where_max_differs_from_union"].sum())
    return f" In this run they differ on {differing} images."


def deviations(study: Study) -> str:
    """A Markdown list of every known difference from the article, with this run's figures."""
    cfg = study.cfg
    checks = _rule_checks(study)
    table8 = published("table8")
    max_dsc, union_dsc = table8.loc["Max", "DSC"], table8.loc["Union", "DSC"]
    lines = [
        "## Where this study differs from the article, and why",
        "",
        "- **F1 vs DSC.** For binary masks F1 = 2PR/(P+R) equals DSC on every image, and so in every table here. "
        "The article's Tables 2–3 print F1 ≠ DSC for the failing backbones (ResNet50: DSC 12.95 %, F1 37.79 %). "
        "The most consistent explanation: scikit-learn 1.3.0's `f1_score(..., zero_division=1)` returned 1 on "
        "images with TP = 0 and both FP and FN > 0 (scikit-learn issues #26864, #26965). "
        f"`analysis.paper_style_f1: true` adds that F1 as a column (this run: {'on' if cfg.analysis.paper_style_f1 else 'off'}).",
        f"- **Max = union.** Eq. 9 (max_k P_k > T) and eq. 14 (any P_k > T) give the same mask, so Max and Union "
        f"always agree here; the article prints different values (Table 8 DSC: max {max_dsc:.2f} %, union "
        f"{union_dsc:.2f} %), so its union masks must have been made another way (e.g. binarised before resizing)."
        + _max_vs_union(checks),
        "- **Shape averaging with an empty member.** A member mask with no foreground has no distance map; it "
        "counts as −(H + W) everywhere, voting background as strongly as possible. Images where a member's mask "
        f"was empty at T = {cfg.stage4.threshold}: {_empty_members(checks)}.",
        f"- **Stage-3 initialisation** (`stage3.init_from`, this run: `{cfg.stage3.init_from}`). The article says "
        "the ten encoders were retrained at 512² but not whether from ImageNet or from their stage-2 weights; "
        "`imagenet` (the default) is the literal reading, `stage2` continues the stage-2 run.",
        "- **Model selection on validation only.** The article's ten selected encoders are exactly the ten best by "
        "its Table 2 (*test*) DSC among those ≥ 91.5 % (cut between EfficientNetB4, 91.58 %, and the plain U-Net, "
        "91.53 %): it may have selected on test. This study ranks by mean validation DSC and never looks at test "
        "data for any choice (selection, tuned threshold, stacker).",
        "- **Statistics by patient.** Where a dataset holds several images of one patient (AASCE: up to 7 in a "
        "test split), Wilcoxon tests compare per-patient means and the bootstrap resamples patients; every table "
        "of tests and intervals gives both counts. With one image per patient (the synthetic data) this equals "
        "the per-image analysis.",
        "- **What the `paper` profile changes against the article.** PyTorch encoders from segmentation-models-"
        "pytorch / timm stand in for the article's (likely Keras) ones (SEResNet34 = timm `legacy_seresnet34`, "
        "InceptionV3 = timm `inception_v3`); the encoder-less U-Net ('None') is a Ronneberger U-Net with "
        "BatchNorm, trained from scratch beside the pretrained encoders; stage 1's VGG16 uses ImageNet weights "
        "(the article does not say); early-stopping patience starts once validation DSC > 0, and the output bias "
        "starts at logit(0.01) (both only matter for models that start predicting nothing); training on CUDA "
        "uses fp16 autocast.",
        "- **Numbers depend on the machine.** Thread count and hardware change floating-point sums, so the same "
        "profile and seed give slightly different tables on another machine; compare with the spread over seeds, "
        "not the last digit.",
    ]
    if cfg.data.source == "aasce" and cfg.data.later_batch:
        lines.append(f"- **Dataset 2 is a later batch of the same hospital.** The article's dataset 2 is another source "
                     f"(VinDr-SpineXR); here it is the latest {cfg.data.later_batch:.0%} of the AASCE training split by "
                     "acquisition day (`data.later_batch`, patient groups whole): radiographs taken after every "
                     "training image, the shift a model meets in use, which a random split never shows.")
    if cfg.stage4.choose_by != "dsc" or cfg.analysis.primary_endpoint != "dsc":
        lines.append(f"- **Which four vertebrae decide.** The article chooses and compares by DSC. This run chooses its "
                     f"best rule and model on validation by `{cfg.stage4.choose_by}` and declares "
                     f"`{cfg.analysis.primary_endpoint}` its primary endpoint (`analysis.primary_endpoint`), because a "
                     "mask one vertebra off keeps a DSC near 0.75; DSC is reported beside it as secondary.")
    return "\n".join(lines)
