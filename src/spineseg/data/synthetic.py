"""Synthetic frontal chest radiographs with Th8–Th11 vertebral-body masks: the study's built-in data.

The paper's two datasets (183 CheXpert-derived images; 58 external test images) cannot be shipped, so
the pipeline runs end to end on phantoms that keep what makes the task hard on real radiographs: a
whole column of look-alike vertebrae in which Th8–Th11 are defined only by their position, ribs and
transverse processes crossing the spine, the heart and the diaphragm overlying exactly the target
levels, and bone only moderately denser than what surrounds it. Domain ``d2`` draws the same anatomy
through a worse acquisition (lower contrast, more noise and blur, another gamma), so a model trained
on ``d1`` meets a genuine domain shift, as in the paper's external test.

Geometry is described in "chest coordinates": units of the image side, (0.5, 0.5) the image centre
before the per-image pose (scale, rotation, shift) is applied. Every structure is a polygon in these
coordinates, so the mask is exactly the rasterised vertebral bodies that were rendered.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from spineseg.data.dataset import DatasetError, Sample, as_hw, check_seed, fresh_output, write_dataset
from spineseg.vertebrae import BACKGROUND, CODES, region_mask

LEVELS = ("C6", "C7", *(f"Th{k}" for k in range(1, 13)), "L1", "L2", "L3")
PAPER_COUNTS = {"d1": 183, "d2": 58}
MIN_SIZE = 32

_TH1 = LEVELS.index("Th1")
_LEVEL_CODES = np.array([BACKGROUND, *(CODES[name] for name in LEVELS)], dtype=np.uint8)  # column value → code
_REFERENCE_SIZE = 512  # blur sigmas in DomainStyle are pixels at this image size
_SOFT_TISSUE_DOWNSAMPLING = 2  # soft tissue is smooth: render it small, blur there, upsample
_SOFT_TISSUE_BLUR = 0.005  # organ edge unsharpness, in units of the image side
_EXTERNAL_TEST_DOMAINS = ("d2",)  # like the paper's dataset 2: never trained on, only tested


@dataclass(frozen=True)
class DomainStyle:
    """Acquisition look of one synthetic dataset; the anatomy generator is shared, so a gap is domain shift."""

    contrast: float  # span of the output grey range the display curve maps onto
    brightness: float  # offset of that range (fogged, low-contrast films sit higher)
    gamma: float  # display curve exponent (>1 darkens mid-tones and flattens the dark lung fields)
    bone_density: float  # multiplier on every bone's attenuation
    noise_sigma: float  # additive detector noise, in [0, 1] intensity units
    blur_sigma: float  # detector/motion blur in pixels at 512²
    shading: float  # amplitude of smooth exposure inhomogeneity
    pose_spread: float  # multiplier on positioning and scoliosis variation between patients


DOMAINS = {
    "d1": DomainStyle(contrast=0.95, brightness=0.02, gamma=1.0, bone_density=1.0, noise_sigma=0.012,
                      blur_sigma=0.7, shading=0.04, pose_spread=0.5),
    "d2": DomainStyle(contrast=0.75, brightness=0.12, gamma=1.3, bone_density=0.9, noise_sigma=0.025,
                      blur_sigma=1.4, shading=0.08, pose_spread=1.3),
}


@dataclass(frozen=True)
class Phantom:
    """One rendered radiograph with its whole column, to show Th8–Th11 is a position, not any vertebra."""

    image: np.ndarray  # uint8 [H, W]
    column: np.ndarray  # uint8 [H, W]: k > 0 is the body of LEVELS[k - 1], 0 elsewhere

    @property
    def labels(self) -> np.ndarray:
        """Every body's level code (`spineseg.vertebrae`: C6 = 23, C7 = 24, Th1 = 1 … L3 = 15), 0 elsewhere."""
        return _LEVEL_CODES[self.column]


@dataclass(frozen=True)
class _Pose:
    """Patient positioning: one similarity transform shared by every structure of an image."""

    scale: float
    angle: float
    shift_x: float
    shift_y: float

    def to_pixels(self, x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - 0.5, y - 0.5
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        col = (0.5 + self.shift_x + self.scale * (cos * dx - sin * dy)) * size - 0.5
        row = (0.5 + self.shift_y + self.scale * (sin * dx + cos * dy)) * size - 0.5
        return col, row

    def to_chest_x(self, size: int) -> np.ndarray:
        """Chest x of every pixel centre, for effects that depend on distance from the midline."""
        centres = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
        dx = centres[None, :] - self.shift_x
        dy = centres[:, None] - self.shift_y
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return 0.5 + (cos * dx + sin * dy) / self.scale


class _Canvas:
    """Additive polygon rasteriser: overlapping structures sum, as attenuations do on a film.

    Each polygon only marks where its spans start and end on every pixel row (even-odd rule, pixel
    centres inside); one cumulative sum per canvas turns the marks into the image. That keeps a few
    hundred polygons per radiograph cheap.
    """

    def __init__(self, size: int, pose: _Pose, dtype: type = np.float64):
        self.size = size
        self.pose = pose
        self._span_marks = np.zeros((size, size + 1), dtype=dtype)

    def fill(self, x: np.ndarray, y: np.ndarray, value: float) -> None:
        col, row = self.pose.to_pixels(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), self.size)
        first, last = max(int(np.ceil(row.min())), 0), min(int(np.floor(row.max())), self.size - 1)
        if first > last:
            return
        scanlines = np.arange(first, last + 1)[:, None]
        next_col, next_row = np.concatenate([col[1:], col[:1]]), np.concatenate([row[1:], row[:1]])
        crossing = (row <= scanlines) != (next_row <= scanlines)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = col + (scanlines - row) * (next_col - col) / (next_row - row)
        at = np.sort(np.where(crossing, at, np.inf), axis=1)
        pairs = at.shape[1] // 2
        starts, ends = at[:, 0:2 * pairs:2], at[:, 1:2 * pairs:2]
        rows, slot = np.nonzero(np.isfinite(ends))
        edges = np.concatenate([starts[rows, slot], ends[rows, slot]])
        columns = np.clip(np.ceil(edges), 0, self.size).astype(np.intp)
        signs = np.repeat(np.array([value, -value], dtype=self._span_marks.dtype), len(rows))
        np.add.at(self._span_marks, (np.tile(rows + first, 2), columns), signs)

    @property
    def pixels(self) -> np.ndarray:
        """The summed polygons, [size, size]."""
        return np.cumsum(self._span_marks, axis=1)[:, : self.size]


@dataclass(frozen=True)
class _Vertebra:
    centre_x: float
    centre_y: float
    half_width: float
    half_height: float
    tilt: float

    def place(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local coordinates in half-widths/half-heights (v down) → chest coordinates."""
        lx, ly = u * self.half_width, v * self.half_height
        cos, sin = np.cos(self.tilt), np.sin(self.tilt)
        return self.centre_x + cos * lx - sin * ly, self.centre_y + sin * lx + cos * ly


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
             points: int = 24) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    ex, ey = rx * np.cos(t), ry * np.sin(t)
    cos, sin = np.cos(angle), np.sin(angle)
    return cx + cos * ex - sin * ey, cy + sin * ex + cos * ey


def _band(x: np.ndarray, y: np.ndarray, half_thickness: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polygon of a thick curve (rib, clavicle) around its centreline."""
    dx, dy = np.gradient(x), np.gradient(y)
    norm = np.hypot(dx, dy)
    nx, ny = -dy / norm * half_thickness, dx / norm * half_thickness
    return np.concatenate([x + nx, (x - nx)[::-1]]), np.concatenate([y + ny, (y - ny)[::-1]])


def _smooth_closed(x: np.ndarray, y: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Chaikin corner cutting: turns a handful of control points into an organ outline."""
    for _ in range(rounds):
        xn, yn = np.roll(x, -1), np.roll(y, -1)
        x = np.stack([0.75 * x + 0.25 * xn, 0.25 * x + 0.75 * xn], axis=1).ravel()
        y = np.stack([0.75 * y + 0.25 * yn, 0.25 * y + 0.75 * yn], axis=1).ravel()
    return x, y


def _column(rng: np.random.Generator, spread: float) -> list[_Vertebra]:
    """Stacked bodies growing downwards along a smooth scoliotic curve, with per-level size jitter."""
    n = len(LEVELS)
    below_th1 = np.arange(n) - _TH1
    pitch = rng.uniform(0.047, 0.053) * (1 + 0.032 * below_th1) * (1 + rng.normal(0, 0.025, n))
    centres_y = np.concatenate([[0.0], np.cumsum((pitch[:-1] + pitch[1:]) / 2)])
    centres_y += rng.uniform(0.12, 0.16) - centres_y[_TH1]
    body_fraction = rng.uniform(0.74, 0.80)
    half_width = (rng.uniform(0.031, 0.037) * (1 + 0.045 * np.maximum(below_th1, -1))
                  * (1 + rng.normal(0, 0.03, n)))
    amplitude = spread * rng.uniform(-0.025, 0.025)
    wavelength = rng.uniform(0.8, 1.6)
    phase = rng.uniform(0, 2 * np.pi)
    lean = spread * rng.uniform(-0.03, 0.03)
    centres_x = 0.5 + amplitude * np.sin(2 * np.pi * centres_y / wavelength + phase) + lean * (centres_y - 0.5)
    slope = amplitude * 2 * np.pi / wavelength * np.cos(2 * np.pi * centres_y / wavelength + phase) + lean
    tilt = -np.arctan(slope) + np.deg2rad(spread * rng.normal(0, 1.0, n))
    return [_Vertebra(float(centres_x[i]), float(centres_y[i]), float(half_width[i]),
                      float(pitch[i] * body_fraction * (1 + rng.normal(0, 0.03)) / 2), float(tilt[i]))
            for i in range(n)]


def _body_outline(vertebra: _Vertebra, squareness: float, taper: float, waist: float,
                  shrink: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Rounded trapezoid (superellipse), wider at the bottom and slightly waisted at mid-height."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    cos, sin = np.cos(t), np.sin(t)
    v = np.sign(sin) * np.abs(sin) ** (2 / squareness)
    u = np.sign(cos) * np.abs(cos) ** (2 / squareness) * (1 + taper * v) * (1 - waist * (1 - v**2))
    return vertebra.place(u * shrink[0], v * shrink[1])


def _draw_spine(bone: _Canvas, column: _Canvas, vertebrae: list[_Vertebra], rng: np.random.Generator,
                density: float) -> None:
    """Bodies with cortical rims and pedicle rings, plus spinous and transverse processes outside the body."""
    squareness, taper, waist = rng.uniform(3.5, 5.0), rng.uniform(0.0, 0.07), rng.uniform(0.03, 0.08)
    for level, v in enumerate(vertebrae):
        # Lower bodies are thicker front to back, hence denser on the film.
        level_density = density * (0.85 + 0.025 * (level - _TH1))
        outline = _body_outline(v, squareness, taper, waist)
        bone.fill(*outline, 0.22 * level_density)
        column.fill(*outline, level + 1)
        bone.fill(*_body_outline(v, squareness, taper, waist, shrink=(0.78, 0.72)), -0.11 * level_density)
        for side in (-1, 1):
            bone.fill(*v.place(*_ellipse(side * 0.6, -0.3, 0.16, 0.28)), 0.10 * level_density)
            bone.fill(*v.place(*_ellipse(side * 0.6, -0.3, 0.09, 0.16)), -0.06 * level_density)
            if LEVELS[level].startswith("Th"):
                process = _ellipse(side * 1.15, -0.35, 0.32, 0.2, angle=-side * 0.25)
            elif LEVELS[level].startswith("L"):
                process = _ellipse(side * 1.3, -0.05, 0.45, 0.13)
            else:
                process = _ellipse(side * 1.0, 0.0, 0.2, 0.2)
            bone.fill(*v.place(*process), 0.14 * level_density)
        bone.fill(*v.place(*_ellipse(0.0, 0.75, 0.09, 0.42)), 0.08 * level_density)


def _draw_ribs(bone: _Canvas, vertebrae: list[_Vertebra], rng: np.random.Generator, density: float,
               thorax_half_width: float) -> None:
    """Rib hoops seen from the front: posterior arcs leave the transverse processes, anterior arcs return lower.

    A hoop is parametrised by its angle ``phi`` around the chest (0 at the spine, pi/2 at the lateral
    wall); the anterior half is fainter because its ends are cartilage.
    """
    drop = rng.uniform(0.15, 0.19)
    bow = rng.uniform(0.01, 0.02)
    for k in range(1, 13):
        lateral_wall = thorax_half_width * (1 - np.exp(-(k + 0.6) / 2.6))
        for side in (-1, 1):
            start_x, start_y = vertebrae[_TH1 + k - 1].place(np.array([side * 1.3]), np.array([-0.3]))
            reach, phi_end = lateral_wall - abs(start_x[0] - 0.5), np.pi / 2
            if k >= 11:  # floating ribs: short, and they end before turning forwards
                shortening, phi_end = (0.55, 1.35) if k == 11 else (0.4, 1.2)
                reach *= shortening

            def arc(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return (start_x[0] + side * reach * np.sin(phi),
                        start_y[0] + drop * (1 - np.cos(phi)) / 2 - bow * np.sin(2 * phi))

            half = rng.uniform(0.008, 0.010)
            posterior = arc(np.linspace(0.0, phi_end, 32))
            bone.fill(*_band(*posterior, half), 0.15 * density)
            bone.fill(*_band(*posterior, 0.45 * half), -0.05 * density)
            if k <= 10:
                bone.fill(*_band(*arc(np.linspace(np.pi / 2, rng.uniform(2.45, 2.65), 24)), 1.2 * half),
                          0.06 * density)


def _draw_clavicles(bone: _Canvas, rng: np.random.Generator, density: float, top: float) -> None:
    medial_y = top + rng.uniform(0.06, 0.10)
    lateral_rise = rng.uniform(0.02, 0.07)
    s = np.linspace(0, 1, 32)
    for side in (-1, 1):
        x = 0.5 + side * (0.05 + 0.33 * s)
        y = medial_y - lateral_rise * s + 0.012 * np.sin(2 * np.pi * s)
        half = 0.011 * (1.2 - 0.3 * s)
        bone.fill(*_band(x, y, half), 0.28 * density)
        bone.fill(*_band(x, y, 0.5 * half), -0.08 * density)


def _soft_tissue(rng: np.random.Generator, pose: _Pose, size: int, thorax_half_width: float,
                 vertebrae: list[_Vertebra]) -> np.ndarray:
    """Body, lungs, heart, abdomen, trachea, aorta and gastric bubble, as attenuation at full size."""
    low = max(size // _SOFT_TISSUE_DOWNSAMPLING, 16)
    h = thorax_half_width
    wall = h + rng.uniform(0.08, 0.11)
    body = _Canvas(low, pose)
    body_x = np.array([-0.09, -0.085, -0.25, -0.9 * wall, -wall, -wall, wall, wall, 0.9 * wall, 0.25, 0.085, 0.09])
    body_y = np.array([-0.2, 0.03, 0.07, 0.12, 0.3, 1.3, 1.3, 0.3, 0.12, 0.07, 0.03, -0.2])
    body.fill(*_smooth_closed(0.5 + body_x, body_y, rounds=2), 1.0)
    midline_distance = np.abs(pose.to_chest_x(low) - 0.5) / wall
    thickness = 0.6 + 0.4 * np.sqrt(np.clip(1 - midline_distance**2, 0, 1))
    organs = _Canvas(low, pose)

    apex, angle_y, dome = rng.uniform(0.07, 0.11), rng.uniform(0.75, 0.80), rng.uniform(0.62, 0.67)
    medial = rng.uniform(0.055, 0.065)
    lungs = _Canvas(low, pose)
    for side, dome_y in ((-1, dome), (1, dome + rng.uniform(0.01, 0.04))):
        lx = np.array([0.30 * h, 0.62 * h, 0.85 * h, 0.97 * h, h, 0.97 * h, 0.78 * h, 0.55 * h, 0.32 * h,
                       0.16 * h, medial, medial, 0.16 * h]) * (1 + rng.normal(0, 0.02, 13))
        ly = np.array([apex, apex + 0.035, apex + 0.13, apex + 0.30, (apex + angle_y) / 2 + 0.1, angle_y,
                       dome_y + 0.035, dome_y, dome_y + 0.015, dome_y + 0.05, dome_y + 0.04, apex + 0.2,
                       apex + 0.03])
        lungs.fill(*_smooth_closed(0.5 + side * lx, ly), -0.62 * rng.uniform(0.85, 1.1))
        abdomen_x = np.array([0.0, 0.32 * h, 0.55 * h, 0.78 * h, 0.97 * h, h, 1.3 * wall, 1.3 * wall, 0.0])
        abdomen_y = np.array([dome_y + 0.07, dome_y + 0.015, dome_y, dome_y + 0.035, angle_y, angle_y + 0.05,
                              angle_y + 0.25, 1.3, 1.3])
        organs.fill(*_smooth_closed(0.5 + side * abdomen_x, abdomen_y, rounds=2), 0.36 * rng.uniform(0.85, 1.15))

    heart = _Canvas(low, pose)
    heart_x, heart_y = _ellipse(0.0, 0.0, rng.uniform(0.14, 0.17), rng.uniform(0.12, 0.15),
                                angle=rng.uniform(0.3, 0.55), points=48)
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    lobes = 1 + 0.06 * np.sin(2 * t + rng.uniform(0, 2 * np.pi)) + 0.03 * np.sin(3 * t + rng.uniform(0, 2 * np.pi))
    heart_centre_x, heart_centre_y = 0.5 + rng.uniform(0.05, 0.08), dome + rng.uniform(-0.09, -0.06)
    heart.fill(heart_centre_x + heart_x * lobes, heart_centre_y + heart_y * lobes, 1.0)
    th4 = vertebrae[_TH1 + 3]
    trachea_x = np.array([-1, 1, 1, -1]) * rng.uniform(0.018, 0.024) + 0.5
    organs.fill(trachea_x, np.array([-0.2, -0.2, th4.centre_y, th4.centre_y]), -0.18)
    organs.fill(*_ellipse(0.5 + rng.uniform(0.05, 0.07), th4.centre_y, 0.035, 0.03), 0.12)
    organs.fill(*_ellipse(0.5 + 0.55 * h, dome + 0.09, 0.05, 0.03), -0.25 * rng.uniform(0.3, 1.0))

    # Air is displaced where the heart lies in front of the lung; vessels make the remaining air uneven.
    vessels = ndimage.gaussian_filter(rng.standard_normal((low, low)), 0.004 * low)
    vessels /= vessels.std()
    heart_cover = heart.pixels
    soft = (body.pixels * thickness + organs.pixels + 0.22 * rng.uniform(0.85, 1.15) * heart_cover
            + lungs.pixels * (1 - 0.85 * heart_cover) * (1 + 0.08 * vessels))
    blurred = ndimage.gaussian_filter(soft.astype(np.float32), _SOFT_TISSUE_BLUR * low)
    return np.asarray(Image.fromarray(blurred).resize((size, size), Image.Resampling.BILINEAR))


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 5) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _check(domain: str, size: int, seed: int) -> DomainStyle:
    if domain not in DOMAINS:
        raise DatasetError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    if int(size) < MIN_SIZE:
        raise DatasetError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    as_hw(int(size))
    check_seed(seed)
    return DOMAINS[domain]


def render(domain: str, index: int, seed: int = 0, size: int = 512) -> Phantom:
    """Render image ``index`` of a domain; seeded per (seed, domain, index), so any image is reproducible alone."""
    style = _check(domain, size, seed)
    if int(index) < 0:
        raise DatasetError(f"index must be a non-negative integer, got {index}")
    size = int(size)
    rng = np.random.default_rng([int(seed), zlib.crc32(domain.encode()), int(index)])
    spread = style.pose_spread
    pose = _Pose(scale=1 + spread * rng.uniform(-0.08, 0.08), angle=np.deg2rad(spread * rng.uniform(-4, 4)),
                 shift_x=spread * rng.uniform(-0.035, 0.035), shift_y=spread * rng.uniform(-0.035, 0.035))
    thorax_half_width = 0.36 * rng.uniform(0.92, 1.08)
    density = style.bone_density * rng.uniform(0.85, 1.15)

    vertebrae = _column(rng, spread)
    bone = _Canvas(size, pose)
    column = _Canvas(size, pose, dtype=np.int16)
    _draw_spine(bone, column, vertebrae, rng, density)
    _draw_ribs(bone, vertebrae, rng, density, thorax_half_width)
    _draw_clavicles(bone, rng, density, vertebrae[_TH1].centre_y)
    attenuation = (_soft_tissue(rng, pose, size, thorax_half_width, vertebrae) + bone.pixels).astype(np.float32)

    # Film response: exponential saturation makes bone behind the heart and diaphragm fainter.
    steepness = rng.uniform(1.05, 1.3)
    intensity = (1 - np.exp(-steepness * np.maximum(attenuation, 0))) / (1 - np.exp(-steepness * 2.0))
    intensity = np.clip(intensity, 0, 1) ** (style.gamma * rng.uniform(0.9, 1.1))
    intensity = style.brightness + style.contrast * rng.uniform(0.95, 1.05) * intensity
    intensity += style.shading * _smooth_field(rng, size)
    resolution_ratio = size / _REFERENCE_SIZE
    intensity = ndimage.gaussian_filter(intensity.astype(np.float32), style.blur_sigma * resolution_ratio)
    intensity += style.noise_sigma * rng.standard_normal((size, size), dtype=np.float32)
    image = np.round(np.clip(intensity, 0, 1) * 255).astype(np.uint8)
    return Phantom(image=image, column=column.pixels.astype(np.uint8))


def generate(domain: str, count: int, seed: int = 0, size: int = 512) -> Iterator[Sample]:
    """Yield ``count`` samples of a domain lazily, so a whole dataset never sits in memory."""
    _check(domain, size, seed)
    if int(count) < 1:
        raise DatasetError(f"count must be at least 1, got {count}")

    def samples() -> Iterator[Sample]:
        for index in range(int(count)):
            phantom = render(domain, index, seed, size)
            labels = phantom.labels
            yield Sample(id=f"{domain}_{index:04d}", image=phantom.image, mask=region_mask(labels), labels=labels,
                         patient=f"{domain}-{index:03d}", source=f"synthetic-{domain}")

    return samples()


def synthesize(out: str | Path, seed: int = 0, size: int = 512,
               counts: Mapping[str, int] | None = None, force: bool = False) -> dict[str, Path]:
    """Write the default study data: ``out/d1`` split 70/10/20, ``out/d2`` all test (external set).

    ``counts`` maps domain → number of images (default: the paper's 183 and 58); only the domains it
    names are written. A non-empty ``out`` is refused unless ``force`` (see `fresh_output`).
    """
    counts = dict(PAPER_COUNTS if counts is None else counts)
    if not counts:
        raise DatasetError("counts must name at least one domain")
    for domain, count in counts.items():
        _check(domain, size, seed)
        if int(count) < 1:
            raise DatasetError(f"counts[{domain!r}] must be at least 1, got {count}")
    with fresh_output(out, force) as staging, \
            tqdm(total=sum(counts.values()), desc="synthesizing radiographs", unit="img") as progress:
        def tracked(samples: Iterator[Sample]) -> Iterator[Sample]:
            for sample in samples:
                yield sample
                progress.update(1)

        for domain, count in counts.items():
            write_dataset(staging, domain, tracked(generate(domain, count, seed, size)),
                          test_only=domain in _EXTERNAL_TEST_DOMAINS, seed=seed)
    return {domain: Path(out) / domain for domain in counts}
