"""A trained model as a folder that describes itself: ``model.json`` beside its weights ``best.pt``.

model.json says what the network is (architecture, encoder, attention, output classes and the level
each one stands for), what it sees (input size and channels, the stored grid its training images had,
how pixels are scaled), where its weights started, how it ran and what it reached, and which code made
it. Loading a folder needs nothing else: no profile, no run spec, no training data.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from spineseg import atomic
from spineseg.crops import CropGeometry
from spineseg.encoders import canonical_architecture, canonical_encoder
from spineseg.errors import ModelError
from spineseg.limits import MAX_SIDE
from spineseg.models import build_model
from spineseg.names import CENTRES, PRECISIONS, TARGETS
from spineseg.objectives import objective
from spineseg.predict import Segmenter, load_weights
from spineseg.vertebrae import CHAIN, NAMES, REGION, REGION_CODES

# the files of a model's folder: its weights and, while `spineseg.train.fit` trains it, its progress
BEST = "best.pt"  # a trained model's weights: those of its best validation epoch
CHECKPOINT = "checkpoint.pt"  # the last finished epoch: weights, optimiser, counters, history
HISTORY = "history.csv"  # one row per epoch
MODEL_FILE = "model.json"
FORMAT = "spineseg-model/1"
PIXELS = ("grayscale scaled to [0, 1] (16-bit PNG by the bits it uses; DICOM rescaled, MONOCHROME1 inverted), "
          "resized with PIL's bilinear filter (area-aware when shrinking), first to `grid` when given, then to "
          "`input_size`; EfficientNet-Lite encoders rescale the image channel inside the network")


@dataclass(frozen=True)
class ModelDescription:
    """What model.json holds; `build` makes the network it describes."""

    name: str  # how the study's tables name it, e.g. "MobileNetV2 (levels)"
    encoder: str
    architecture: str
    target: str  # `spineseg.objectives.TARGETS`
    input_size: tuple[int, int]  # (height, width)
    coordinates: bool = False  # two extra input planes: row and column in [-1, 1]
    attention: bool = False
    grid: tuple[int, int] | None = None  # the stored size of its training images; None where they differed
    crop: CropGeometry | None = None  # a crop model of the two-stage variant
    weights_origin: dict = field(default_factory=dict)  # pretrained, weights_path, init: where training started
    precision: str = "auto"
    metrics: dict = field(default_factory=dict)
    code_version: dict = field(default_factory=dict)
    chain_prior: dict | None = None  # a locator's `spineseg.chain.ChainPrior`: how its training vertebrae were spaced

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        if isinstance(self.crop, dict):
            if "size" not in self.crop:
                raise ValueError("crop has no size")
            object.__setattr__(self, "crop", CropGeometry(**{**self.crop, "size": tuple(self.crop["size"])}))
        elif self.crop is not None and not isinstance(self.crop, CropGeometry):
            raise ValueError(f"crop must be a geometry or null, got {self.crop!r}")

    @property
    def in_channels(self) -> int:
        return 3 if self.coordinates else 1  # the image, and the row and column planes (`build_segmenter`)

    @property
    def classes(self) -> dict[int, str]:
        """Each output channel and what it stands for."""
        if self.target == "binary":
            return {0: "–".join((REGION[0], REGION[-1]))}
        if self.target == CENTRES:
            return {**{k: f"where {name} lies" for k, name in enumerate(CHAIN)},
                    **{len(CHAIN) + k: f"{name} outside the image (mean over pixels)" for k, name in enumerate(CHAIN)}}
        return {0: "background", **{code: NAMES[code] for code in range(1, objective(self.target).classes)}}

    def as_json(self) -> dict:
        spec = asdict(self)
        return {"format": FORMAT, **spec, "in_channels": self.in_channels,
                "output_channels": {str(k): v for k, v in self.classes.items()},
                "region_channels": {"binary": [0], "levels": list(REGION_CODES), CENTRES: []}[self.target], "pixels": PIXELS}

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MODEL_FILE
        atomic.write_json(path, self.as_json())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, shown: str | None = None) -> ModelDescription:
        """The description in a folder, every field checked for its type and bounds (`_Described`): a file from
        elsewhere is one error naming it (`shown`, e.g. a bundle's entry, else its path) and the field."""
        path = Path(folder) / MODEL_FILE
        shown = shown or str(path)
        values = atomic.read_json_object(path, ModelError, f"{Path(folder)} is not a spineseg model folder")
        if values.get("format") != FORMAT:
            raise ModelError(f"{shown}: format {values.get('format')!r}, expected {FORMAT!r}")
        try:
            checked = _Described.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise ModelError(f"{shown}: {field} = {error.get('input')!r}: {error['msg']}") from None
        return cls(**checked.model_dump(exclude={"crop"}), crop=checked.crop and CropGeometry(**checked.crop.model_dump()))

    def build(self) -> Segmenter:
        """The untrained network this folder's weights fit (never downloads anything)."""
        return build_segmenter(self.encoder, self.architecture, self.target, self.coordinates, self.attention)


def build_segmenter(encoder: str, architecture: str, target: str, coordinates: bool, attention: bool,
                    pretrained: str = "none", weights_path: str | None = None) -> Segmenter:
    """The one place a network is built, for training (from `pretrained` encoder weights) and for loading a saved
    model (from nothing): the decoder and encoder, the objective's output channels, the inputs' channels."""
    task = objective(target)
    net = build_model(encoder, architecture, pretrained, weights_path, in_channels=3 if coordinates else 1,
                      classes=task.classes, attention=attention)
    return Segmenter(net, task, coordinates)


Side = Annotated[int, Field(strict=True, ge=1, le=MAX_SIDE)]
Share = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]


class _Crop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: tuple[Side, Side]
    margin: Share = 1.0
    jitter: Share = 0.4
    scale_jitter: Share = 0.1
    copies: Annotated[int, Field(strict=True, ge=1, le=100)] = 2


class _Described(BaseModel):
    """model.json as this version writes it: strict types (``"no"`` is not a boolean, ``"64"`` not a size) and the
    study's bounds on every size, so that a hand-edited or foreign file fails here, naming its field."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    encoder: Annotated[StrictStr, AfterValidator(canonical_encoder)]
    architecture: Annotated[StrictStr, AfterValidator(canonical_architecture)]
    target: Literal[(*TARGETS, CENTRES)]  # type: ignore[valid-type]
    input_size: tuple[Side, Side]
    coordinates: StrictBool = False
    attention: StrictBool = False
    grid: tuple[Side, Side] | None = None
    crop: _Crop | None = None
    weights_origin: dict = Field(default_factory=dict)
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    metrics: dict = Field(default_factory=dict)
    code_version: dict = Field(default_factory=dict)
    chain_prior: dict | None = None


def load_model(folder: str | os.PathLike, device: torch.device, shown: str | None = None) -> tuple[ModelDescription, Segmenter]:
    """A model folder's description and its network with the best weights, in evaluation mode on `device`; messages
    name the folder as `shown` (a bundle's entry, say) where given."""
    description = ModelDescription.load(folder, shown)
    return description, load_weights(description.build(), Path(folder) / BEST, device, shown and f"{shown}/{BEST}")
