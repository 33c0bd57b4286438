"""Display names: the one table of how metrics, ensemble rules and study groups are printed.

Keys are what the code and the CSV files use; values are the article's wording. Torch-free, so the
configuration and the command line can use it without loading the models.
"""

from __future__ import annotations

from types import MappingProxyType

# The seven per-image metrics of the article, in its column order.
METRICS = ("iou", "dsc", "recall", "specificity", "precision", "f1", "pa")
BOUNDARY_METRICS = ("hd95", "assd")
METRIC_NAMES = MappingProxyType({
    "iou": "IoU", "dsc": "DSC", "recall": "Recall", "specificity": "Specificity", "precision": "Precision",
    "f1": "F1", "pa": "PA", "hd95": "HD95", "assd": "ASSD",
    "f1_sklearn13": "F1 (scikit-learn 1.3)",
    "ap": "mAP",
})

# The five rules of the article (eq. 8–17), then rules it does not test.
RULES = ("max", "min", "soft", "union", "shape")
EXTRA_RULES = ("geometric", "majority", "weighted", "staple")
# Stage-4 results that learn something on dataset-1 validation.
TUNED = "tuned_soft"
STACKING = "stacking"
CALIBRATED = "calibrated_soft"
# The two-stage variant: the validation-best rule locates Th8–Th11, a crop model outlines it; and its baseline,
# the validation-best single model behind the same crop model (two-stage vs it = the ensemble's share of the gain).
TWO_STAGE = "two_stage"
SINGLE_CROP = "single_crop"
# The located variant: the locator names Th8–Th11 by counting the chain C7…S1, the crop model outlines them.
LOCATED = "located"
# The peer a user would pick instead: nnU-Net v2 at the study's budget (`spineseg.nnunet_peer`).
NNUNET = "nnunet"
# Identification's reference rows: the locator's centres alone, and the position priors that never look at an image.
LOCATOR = "locator"
PRIOR_BAND = "prior_band"
PRIOR_MEAN = "prior_mean"
RULE_NAMES = MappingProxyType({
    "max": "Max",
    "min": "Min",
    "soft": "Soft voting",
    "union": "Union",
    "shape": "Shape averaging",
    "geometric": "Geometric mean",
    "majority": "Majority voting",
    "weighted": "Weighted soft voting",
    "staple": "STAPLE",
    TUNED: "Soft voting, tuned T",
    STACKING: "Stacking (logistic)",
    CALIBRATED: "Calibrated soft voting",
    TWO_STAGE: "Two-stage (best rule + crop model)",
    SINGLE_CROP: "Best single model + crop model",
    LOCATED: "Located (locator + crop model)",
    NNUNET: "nnU-Net v2 (2d, set budget)",
    LOCATOR: "Locator (its centres)",
    PRIOR_BAND: "Position prior: band of rows",
    PRIOR_MEAN: "Position prior: mean position",
})

# Stage 1's two arms, keyed by whether augmentation was on.
AUGMENTATION_GROUPS = MappingProxyType({False: "Without augmentation", True: "With augmentation"})

# What a model learns to output (`spineseg.objectives`): the article's mask, or every vertebra's level.
TARGETS = ("binary", "levels")  # what an ensemble member learns


def candidate_name(encoder: str, target: str) -> str:
    """How the tables name a model: its encoder, and what it learns unless that is the article's binary mask."""
    return encoder if target == "binary" else f"{encoder} ({target})"

CENTRES = "centres"  # what the locator learns (`spineseg.locator`)

# Optimisers a training stage may use (`spineseg.train.OPTIMIZERS`).
OPTIMIZER_NAMES = ("adam", "rmsprop", "adamax")

# Arithmetic of training and inference (`spineseg.device.autocast`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def is_device(name: str) -> bool:
    """Whether `name` is a device a profile or a command may ask for: auto, cpu, cuda or cuda:<index>."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())

DATASET_NAMES = MappingProxyType({"d1": "Dataset 1", "d2": "Dataset 2"})


def rule_name(key: str) -> str:
    """The printed name of an ensemble rule (or stage-4 result); unknown keys print as themselves."""
    return RULE_NAMES.get(key, key)


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key, key.upper())
