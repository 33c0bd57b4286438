"""Study profiles: ``params/<name>.yaml`` over the article's defaults, plus ``--set`` overrides.

The classes below are the schema and the defaults: every hyperparameter of the article is declared
here once, and a profile may only set keys that exist here, with values of the declared type and
range. A mistake is one `ConfigError` naming the key, the value and where it came from (the file or
the ``--set``), before anything runs. Torch-free, so that validating a profile is instant.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from spineseg.encoders import PAPER_ENCODERS, PRETRAINED, canonical_architecture, canonical_encoder
from spineseg.errors import ConfigError
from spineseg.names import EXTRA_RULES, RULES


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; take it as the number it is meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _unique(values: list) -> list:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"lists {repeated} more than once")
    return values


def _device(name: str) -> str:
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError("must be auto, cpu, cuda or cuda:<index>")


def _multiple_of_32(size: int) -> int:
    if size % 32:
        raise ValueError(f"must be a multiple of 32 (five U-Net downsamplings), got {size}")
    return size


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, le=1)]
LearningRate = Annotated[float, BeforeValidator(_yaml_float), Field(gt=0, lt=1)]
TrainingSize = Annotated[int, Field(ge=32), AfterValidator(_multiple_of_32)]
EncoderName = Annotated[str, AfterValidator(canonical_encoder)]
ArchitectureName = Annotated[str, AfterValidator(canonical_architecture)]
Pretrained = Literal[PRETRAINED]  # type: ignore[valid-type]
Rule = Literal[RULES]  # type: ignore[valid-type]
ExtraRule = Literal[EXTRA_RULES]  # type: ignore[valid-type]


class Section(BaseModel):
    """Unknown keys and values of another type are errors, not silently ignored or converted."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class DataSection(Section):
    source: Literal["synthetic", "aasce", "folder"] = "synthetic"
    seed: Annotated[int, Field(ge=0)] = 0
    size: Annotated[int, Field(ge=16)] = 512  # stored image size (synthetic, aasce)
    d1_count: PositiveInt = 183
    d2_count: PositiveInt = 58
    aasce_src: str = ""  # the boostnet_labeldata folder, relative to the project
    d1: str = ""  # source: folder — dataset folders, relative to the project
    d2: str = ""

    @model_validator(mode="after")
    def _sources_have_their_paths(self) -> DataSection:
        if self.source == "folder" and not self.d1:
            raise ValueError("source: folder needs d1, the folder of dataset 1 (d2 is optional)")
        if self.source == "aasce" and not self.aasce_src:
            raise ValueError("source: aasce needs aasce_src, the boostnet_labeldata folder")
        return self


class Training(Section):
    """What every training stage sets: the run grid and the optimisation."""

    repeats: PositiveInt
    image_size: TrainingSize
    batch_size: PositiveInt = 4
    lr: LearningRate
    max_epochs: PositiveInt
    patience: PositiveInt


class Stage1(Training):
    """U-Net with one encoder, with and without augmentation."""

    encoder: EncoderName = "VGG16"
    repeats: PositiveInt = 50
    image_size: TrainingSize = 256
    lr: LearningRate = 1e-4
    max_epochs: PositiveInt = 100
    patience: PositiveInt = 10
    pretrained: Pretrained = "imagenet"
    weights_path: str = ""  # a local encoder state dict instead of the ImageNet download


class Stage2(Training):
    """Every candidate encoder, repeated; the top k by validation DSC go on."""

    encoders: Annotated[list[EncoderName], AfterValidator(_unique)] = Field(default_factory=lambda: list(PAPER_ENCODERS),
                                                                           min_length=1)
    architecture: ArchitectureName = "unet"
    repeats: PositiveInt = 10
    image_size: TrainingSize = 256
    lr: LearningRate = 1e-4
    max_epochs: PositiveInt = 300
    patience: PositiveInt = 25
    augment: bool = True
    pretrained: Pretrained = "imagenet"
    weights_path: dict[EncoderName, str] = Field(default_factory=dict)  # encoder → a local encoder state dict
    top_k: PositiveInt = 10
    min_val_dsc: Fraction = 0.915


class Stage3(Training):
    """The selected encoders retrained at the final size (architecture, augmentation, weights as stage 2)."""

    repeats: PositiveInt = 1
    image_size: TrainingSize = 512
    lr: LearningRate = 1e-5
    max_epochs: PositiveInt = 300
    patience: PositiveInt = 25
    init_from: Literal["imagenet", "stage2"] = "imagenet"  # the article does not say; see stage3_final


class Stage4(Section):
    threshold: Fraction = 0.5
    methods: Annotated[list[Rule], AfterValidator(_unique)] = Field(default_factory=lambda: list(RULES), min_length=1)
    extra_methods: Annotated[list[ExtraRule], AfterValidator(_unique)] = Field(default_factory=lambda: list(EXTRA_RULES))
    timing_size: PositiveInt = 512
    timing_repeats: PositiveInt = 10
    timing_warmup: Annotated[int, Field(ge=0)] = 2


class Analysis(Section):
    n_boot: Annotated[int, Field(ge=100)] = 2000
    dpi: PositiveInt = 300
    # add F1 as scikit-learn 1.3's f1_score(zero_division=1) scored it: does it explain the article's F1 ≠ DSC?
    paper_style_f1: bool = False


class Profile(Section):
    """A whole study: the article's settings unless a profile says otherwise."""

    description: str = ""
    device: Annotated[str, AfterValidator(_device)] = "auto"
    threads: Annotated[int, Field(ge=0)] = 0  # torch intra-op threads; 0 = every core
    data: DataSection = Field(default_factory=DataSection)
    stage1: Stage1 = Field(default_factory=Stage1)
    stage2: Stage2 = Field(default_factory=Stage2)
    stage3: Stage3 = Field(default_factory=Stage3)
    stage4: Stage4 = Field(default_factory=Stage4)
    analysis: Analysis = Field(default_factory=Analysis)



class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[str, Any]:
    """``stage2.repeats=3`` → ("stage2.repeats", 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from None


def _nest(dotted: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is a value, not a section")
        node[leaf] = value
    return out


def _deep_update(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Profile
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(error: dict, path: Path, overrides: Mapping[str, Any]) -> str:
    """One line: where the value came from, the dotted key, what is wrong, and the value."""
    key = ".".join(str(part) for part in error["loc"])
    origin = next((f"--set {name}={value!r}" for name, value in overrides.items()
                   if key == name or key.startswith(f"{name}.") or name.startswith(f"{key}.")), str(path))
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key}; known: {', '.join(_known_keys(error['loc']))}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: {key} = {error['input']!r}: {message}"


def load_profile(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Profile:
    """Read a profile file, apply dotted overrides and validate the result against the schema."""
    path, overrides = Path(path), dict(overrides or {})
    if not path.is_file():
        raise ConfigError(f"profile file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a profile must be a mapping of settings")
    merged = _deep_update(copy.deepcopy(dict(raw)), _nest(overrides))
    try:
        return Profile.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError("; ".join(_explain(error, path, overrides) for error in exc.errors())) from None
