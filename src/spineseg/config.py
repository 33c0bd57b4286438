"""Study profiles: ``params/<name>.yaml`` merged over the paper's defaults, plus ``--set`` overrides.

The defaults below are the schema: a profile may only set keys that exist here, with values of the
same type, so a typo or a wrong type is one clear error before anything runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

from spineseg.ensemble import EXTRA_METHODS, METHODS
from spineseg.models import ENCODERS, PRETRAINED, canonical_encoder

PAPER_ENCODERS = [name for name in ENCODERS if name != "VGG16"]

# The paper's hyperparameters: the `paper` profile changes nothing here.
DEFAULTS: dict[str, Any] = {
    "description": "",
    "device": "auto",
    "threads": 0,
    "data": {
        "source": "synthetic",  # synthetic | aasce | folder
        "seed": 0,
        "size": 512,
        "d1_count": 183,
        "d2_count": 58,
        "aasce_src": "",
        "d1": "",
        "d2": "",
    },
    "stage1": {
        "encoder": "VGG16",
        "repeats": 50,
        "image_size": 256,
        "batch_size": 4,
        "lr": 1e-4,
        "max_epochs": 100,
        "patience": 10,
        "pretrained": "imagenet",
    },
    "stage2": {
        "encoders": PAPER_ENCODERS,
        "architecture": "unet",
        "repeats": 10,
        "image_size": 256,
        "batch_size": 4,
        "lr": 1e-4,
        "max_epochs": 300,
        "patience": 25,
        "augment": True,
        "pretrained": "imagenet",
        "top_k": 10,
        "min_val_dsc": 0.915,
    },
    "stage3": {
        "image_size": 512,
        "repeats": 1,
        "batch_size": 4,
        "lr": 1e-5,
        "max_epochs": 300,
        "patience": 25,
    },
    "stage4": {
        "threshold": 0.5,
        "methods": list(METHODS),
        "extra_methods": list(EXTRA_METHODS),
        "timing_size": 512,
        "timing_repeats": 10,
        "timing_warmup": 2,
    },
    "analysis": {
        "n_boot": 2000,
        "dpi": 300,
    },
}

SOURCES = ("synthetic", "aasce", "folder")


class ConfigError(ValueError):
    """A profile or override is wrong; the message names the key and the file."""


def _check(value: Any, default: Any, key: str, origin: str) -> Any:
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{origin}: {key} must be a mapping, got {type(value).__name__}")
        merged = copy.deepcopy(default)
        for sub, sub_value in value.items():
            if sub not in default:
                raise ConfigError(f"{origin}: unknown key {key}.{sub}; known: {', '.join(default)}")
            merged[sub] = _check(sub_value, default[sub], f"{key}.{sub}", origin)
        return merged
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{origin}: {key} must be of type {type(default).__name__}, got {value!r}")
    return value


def _check_values(cfg: dict, origin: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{origin}: {key} {message}")

    if cfg["data"]["source"] not in SOURCES:
        fail("data.source", f"must be one of {SOURCES}, got {cfg['data']['source']!r}")
    for stage in ("stage1", "stage2", "stage3"):
        for key in ("image_size", "batch_size", "max_epochs", "patience", "repeats"):
            if cfg[stage].get(key, 1) < 1:
                fail(f"{stage}.{key}", "must be at least 1")
        if cfg[stage]["image_size"] % 32:
            fail(f"{stage}.image_size", f"must be a multiple of 32 (five U-Net downsamplings), got {cfg[stage]['image_size']}")
        if not 0 < cfg[stage]["lr"] < 1:
            fail(f"{stage}.lr", f"must be in (0, 1), got {cfg[stage]['lr']}")
    for stage in ("stage1", "stage2"):
        if cfg[stage]["pretrained"] not in PRETRAINED:
            fail(f"{stage}.pretrained", f"must be one of {PRETRAINED}")
    try:
        cfg["stage1"]["encoder"] = canonical_encoder(cfg["stage1"]["encoder"])
        cfg["stage2"]["encoders"] = [canonical_encoder(e) for e in cfg["stage2"]["encoders"]]
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if not cfg["stage2"]["encoders"]:
        fail("stage2.encoders", "must name at least one encoder")
    for key in ("size", "d1_count", "d2_count"):
        if cfg["data"][key] < 1:
            fail(f"data.{key}", "must be at least 1")
    if cfg["stage2"]["top_k"] < 1:
        fail("stage2.top_k", "must be at least 1")
    for key in ("timing_size", "timing_repeats"):
        if cfg["stage4"][key] < 1:
            fail(f"stage4.{key}", "must be at least 1")
    if cfg["analysis"]["n_boot"] < 100:
        fail("analysis.n_boot", "must be at least 100")
    if not 0 <= cfg["stage2"]["min_val_dsc"] <= 1:
        fail("stage2.min_val_dsc", "must be in [0, 1]")
    if not 0 <= cfg["stage4"]["threshold"] <= 1:
        fail("stage4.threshold", "must be in [0, 1]")
    unknown = sorted(set(cfg["stage4"]["methods"]) - set(METHODS)) + sorted(set(cfg["stage4"]["extra_methods"]) - set(EXTRA_METHODS))
    if unknown:
        fail("stage4.methods", f"has unknown method(s) {unknown}; known: {list(METHODS) + list(EXTRA_METHODS)}")


def parse_override(text: str) -> tuple[str, Any]:
    """``stage2.repeats=3`` → ("stage2.repeats", 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _nest(dotted: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _deep_update(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_profile(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a profile file, apply dotted overrides and validate the result against the defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"profile file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a profile must be a mapping of settings")
    cfg = _check(raw, DEFAULTS, "profile", str(path))
    if overrides:
        cfg = _check(_deep_update(copy.deepcopy(cfg), _nest(overrides)), DEFAULTS, "profile", f"{path} with overrides {dict(overrides)}")
    _check_values(cfg, str(path))
    cfg["name"] = path.stem
    return cfg
