"""The study's decisions as typed records: what stage 2 selected, which runs form the ensemble (stage 3),
what stage 4 learned on validation, and what stage 6 chose and measured.

Each is written and read only through its class, so a reader never guesses a key (`Layout` says where
each file lives). A missing file is a stage that has not run; a file without a field the record needs
was written by another version of the study and is one error naming it.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from spineseg import atomic
from spineseg.errors import StageOrderError


def _read(path: Path, stage: str) -> dict:
    return atomic.read_json_object(path, StageOrderError, f"run {stage}")


@dataclass(frozen=True)
class Selection:
    """The candidates stage 2 chose on validation, best first: (encoder, target) pairs."""

    candidates: tuple[tuple[str, str], ...]

    STAGE = "stage 2 (02_backbone_selection)"

    def save(self, path: Path) -> None:
        atomic.write_json(path, {"candidates": [{"encoder": e, "target": t} for e, t in self.candidates]})

    @classmethod
    def load(cls, path: Path) -> Selection:
        values = _read(path, cls.STAGE)
        try:
            return cls(tuple((c["encoder"], c["target"]) for c in values["candidates"]))
        except (KeyError, TypeError):
            raise StageOrderError(f"{path} does not list candidates with an encoder each; rerun {cls.STAGE}") from None

    @property
    def encoders(self) -> list[str]:
        """The encoders, once each, best first (a level-aware twin counts as its encoder)."""
        return list(dict.fromkeys(encoder for encoder, _ in self.candidates))


@dataclass(frozen=True)
class EnsembleMember:
    """One run of the ensemble: its name in the tables, its folder in the run store, its best validation DSC."""

    name: str
    folder: str
    validation_dsc: float


@dataclass(frozen=True)
class EnsembleMembers:
    """The runs whose probabilities stage 4 combines, in the study's order, as stage 3 trained them: every later
    stage, the figures, `predict --profile` and `export` read this record instead of recomputing the runs."""

    members: tuple[EnsembleMember, ...]
    data: str  # the fingerprint of the data they trained on

    STAGE = "stage 3 (03_final_training)"

    def save(self, path: Path) -> None:
        atomic.write_json(path, {"members": [asdict(member) for member in self.members], "data": self.data})

    @classmethod
    def load(cls, path: Path) -> EnsembleMembers:
        values = _read(path, cls.STAGE)
        try:
            members = tuple(EnsembleMember(str(m["name"]), str(m["folder"]), float(m["validation_dsc"]))
                            for m in values["members"])
            return cls(members, str(values["data"]))
        except (KeyError, TypeError, ValueError):
            raise StageOrderError(f"{path} does not list members with a name, folder and validation DSC each; "
                                  f"rerun {cls.STAGE}") from None

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def checked(self, path: Path, fingerprint: str) -> EnsembleMembers:
        """This record, if its members trained on the data the study has now."""
        if self.data != fingerprint:
            raise StageOrderError(f"{path}: the ensemble trained on data {self.data}, the study's data is now "
                                  f"{fingerprint}; rerun {self.STAGE}")
        return self


@dataclass(frozen=True)
class Learned:
    """What stage 4 fitted and chose on dataset-1 validation."""

    tuned_threshold: float
    stacker: dict
    temperatures: dict[str, float]  # per member, for calibrated soft voting
    models: list[str]  # the members, as the tables name them
    best_model: str
    best_rule: str  # `two_stage` when the crop model behind `two_stage_locator` won
    validation_dsc: dict  # {"models": {name: DSC}, "rules": {rule: DSC}}
    trained_on: str = "d1 validation"
    two_stage_locator: str | None = None  # the rule in front of the crop model, when the study trained one
    # {"models": ..., "rules": ...}: the share identified strictly, where the choice was made by it (stage4.choose_by)
    validation_identified: dict | None = None

    STAGE = "stage 4 (04_ensembles)"

    def save(self, path: Path) -> None:
        atomic.write_json(path, {key: value for key, value in asdict(self).items() if value is not None})

    @classmethod
    def load(cls, path: Path) -> Learned:
        values = _read(path, cls.STAGE)
        absent = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if absent:
            raise StageOrderError(f"{path} has no {', '.join(absent)}: it was written by another version; rerun {cls.STAGE}")
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass(frozen=True)
class PruningResult:
    """One pruning fraction of stage 6's best pair, after fine-tuning: its size and CPU time."""

    fraction: float
    group: str  # how Table 17 names it
    parameters: int
    size_mb: float
    cpu_ms: float
    timing_size: tuple[int, int]

    STAGE = "stage 6 (06_architectures)"

    def __post_init__(self) -> None:
        object.__setattr__(self, "timing_size", tuple(int(v) for v in self.timing_size))

    def save(self, path: Path) -> None:
        atomic.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> PruningResult:
        try:
            return cls.from_dict(_read(path, cls.STAGE))
        except (KeyError, TypeError, ValueError) as exc:
            raise StageOrderError(f"{path}: not a pruning result of this version ({exc}); delete {path.parent} "
                                  f"(a rerun reads it back) and rerun {cls.STAGE}") from None

    @classmethod
    def from_dict(cls, values: dict) -> PruningResult:
        return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Stage6Choices:
    """What stage 6 chose on validation and measured, for its tables and captions."""

    best_pair: tuple[str, str]  # (decoder, encoder) with the best mean validation DSC
    skipped: dict[str, str]  # pair → why smp cannot build it
    attention_pair: tuple[str, str] | None = None  # the best attention-capable pair, when attention was compared
    pruning: tuple[PruningResult, ...] = ()

    STAGE = PruningResult.STAGE

    def save(self, path: Path) -> None:
        atomic.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Stage6Choices:
        values = _read(path, cls.STAGE)
        try:
            attention = values["attention_pair"]
            return cls(tuple(values["best_pair"]), dict(values["skipped"]), tuple(attention) if attention else None,
                       tuple(PruningResult.from_dict(row) for row in values["pruning"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StageOrderError(f"{path} was written by another version ({type(exc).__name__}: {exc}); rerun {cls.STAGE}") from None
