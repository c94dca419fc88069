"""Procedural portraits of fictitious people: a face is a handful of discrete visual traits.

A :class:`Traits` value fixes what a person looks like (background, face shape, skin, hair, eyes,
accessory, shirt). :func:`draw_portrait` paints it with big, flat shapes so that every trait stays
visible after the model's downscaling to 32x32 pixels (each trait covers one or more 8x8 patches),
and adds photo-to-photo variation (shift, scale, brightness, contrast, tint, pixel noise) so that two
photos of one person are never identical while the person stays recognisable.

Geometry is written in a 64x64 design frame and scaled to the requested size; shapes are drawn
at 4x resolution and box-filtered down, so sub-pixel shifts change the image smoothly.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# Palettes: one entry per trait value, kept compact.
# fmt: off
BACKGROUNDS: dict[str, RGB] = {"sky": (140, 190, 240), "mint": (160, 230, 180), "lilac": (200, 170, 235),
                               "slate": (100, 110, 130), "rose": (240, 150, 180), "teal": (50, 160, 160),
                               "olive": (150, 160, 60), "indigo": (70, 60, 150)}
FACE_SHAPES = ("circle", "tall_oval", "square", "diamond", "pear", "triangle")
SKINS: dict[str, RGB] = {"porcelain": (255, 226, 200), "sand": (236, 192, 145), "honey": (214, 160, 95),
                         "bronze": (176, 114, 58), "umber": (128, 78, 40), "ebony": (80, 50, 30)}
HAIR_STYLES = ("short", "spiky", "long", "bun", "mohawk", "curly")
HAIR_COLOURS: dict[str, RGB] = {"black": (25, 25, 25), "brown": (105, 65, 35), "blonde": (240, 210, 100),
                                "red": (190, 55, 25), "white": (240, 240, 240), "blue": (40, 80, 210)}
EYE_COLOURS: dict[str, RGB] = {"brown": (90, 50, 20), "blue": (30, 110, 230), "green": (30, 160, 60),
                               "grey": (130, 130, 130), "violet": (150, 40, 190)}
ACCESSORIES = ("none", "glasses", "earrings", "bow_tie", "headband", "necklace")
SHIRT_COLOURS: dict[str, RGB] = {"red": (210, 30, 40), "orange": (245, 130, 20), "yellow": (245, 220, 30),
                                 "green": (40, 150, 50), "blue": (30, 60, 200), "purple": (120, 40, 150),
                                 "black": (20, 20, 20), "white": (245, 245, 245)}
# fmt: on
SHIRT_PATTERNS = ("plain", "stripes", "dots", "v_neck")

_ACCESSORY_COLOURS: dict[str, RGB] = {
    "glasses": (15, 15, 15),
    "earrings": (255, 190, 0),
    "bow_tie": (220, 20, 120),
    "headband": (0, 210, 240),
    "necklace": (255, 190, 0),
}
_OUTLINE: RGB = (45, 30, 25)
_SUPERSAMPLE = 4
_DESIGN = 64.0  # side of the design frame in which all geometry is written


@dataclass(frozen=True)
class Traits:
    """What a person looks like: one value per visual trait, each a key of the pools above."""

    background: str
    face_shape: str
    skin: str
    hair_style: str
    hair_colour: str
    eye_colour: str
    accessory: str
    shirt_colour: str
    shirt_pattern: str

    def distance(self, other: Traits) -> int:
        """Number of traits in which the two differ."""
        return sum(a != b for a, b in zip(astuple(self), astuple(other), strict=True))


#: the value pool of each trait, in field order
TRAIT_POOLS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "face_shape": FACE_SHAPES,
    "skin": tuple(SKINS),
    "hair_style": HAIR_STYLES,
    "hair_colour": tuple(HAIR_COLOURS),
    "eye_colour": tuple(EYE_COLOURS),
    "accessory": ACCESSORIES,
    "shirt_colour": tuple(SHIRT_COLOURS),
    "shirt_pattern": SHIRT_PATTERNS,
}


def sample_traits(n: int, rng: np.random.Generator, min_distance: int = 3) -> list[Traits]:
    """Draw ``n`` trait sets, every pair differing in at least ``min_distance`` traits.

    Candidates are drawn uniformly and kept when far enough from all kept ones. Raises
    ``ValueError`` when ``n`` exceeds the Singleton bound (no such set can exist) or when random
    search fails to find one.
    """
    sizes = np.array([len(pool) for pool in TRAIT_POOLS.values()])
    n_traits = len(sizes)
    if n < 0 or min_distance < 0:
        raise ValueError(f"n={n} and min_distance={min_distance} must be non-negative")
    if n > 1 and min_distance > n_traits:
        raise ValueError(f"min_distance={min_distance} exceeds the number of traits ({n_traits})")
    # Singleton bound: dropping (min_distance - 1) traits must leave every set distinct.
    capacity = math.prod(sorted(sizes.tolist())[: n_traits - max(min_distance - 1, 0)])
    if n > capacity:
        raise ValueError(f"at most {capacity} trait sets can differ pairwise in {min_distance} traits; asked for {n}")
    kept = np.empty((0, n_traits), dtype=np.int64)
    attempts = 0
    while len(kept) < n:
        attempts += 1
        if attempts > 2000 * max(n, 1):
            raise ValueError(
                f"could not find {n} trait sets at pairwise distance >= {min_distance} (found {len(kept)})"
            )
        candidate = rng.integers(0, sizes)
        if len(kept) == 0 or ((kept != candidate).sum(axis=1) >= min_distance).all():
            kept = np.vstack([kept, candidate])
    pools = list(TRAIT_POOLS.values())
    return [Traits(*(pools[j][int(v)] for j, v in enumerate(row))) for row in kept]


def draw_portrait(traits: Traits, rng: np.random.Generator, size: int = 64, jitter: float = 1.0) -> Image.Image:
    """Paint ``traits`` as a ``size`` x ``size`` RGB photo.

    Photo variation, each scaled by ``jitter`` (at ``size`` 64): shift up to +-3 px, scale +-6 %,
    brightness and contrast +-10 %, a per-channel tint of up to +-10 levels and Gaussian pixel noise
    (sigma 4 levels). ``jitter=0`` gives the canonical photo. The same random numbers are drawn
    whatever ``jitter`` is, so the result depends only on the rng state, the traits and the arguments.
    """
    shift = rng.uniform(-3.0, 3.0, size=2) * jitter
    scale = 1.0 + rng.uniform(-0.06, 0.06) * jitter
    brightness = 1.0 + rng.uniform(-0.1, 0.1) * jitter
    contrast = 1.0 + rng.uniform(-0.1, 0.1) * jitter
    tint = rng.uniform(-10.0, 10.0, size=3) * jitter
    noise = rng.normal(0.0, 4.0, size=(size, size, 3)) * jitter

    big = _Canvas(size * _SUPERSAMPLE, scale, (float(shift[0]), float(shift[1])))
    big.paint(traits)
    img = big.image.resize((size, size), Image.Resampling.BOX)

    pixels = np.asarray(img, dtype=np.float64)
    pixels = ((pixels - 128.0) * contrast + 128.0) * brightness + tint + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _shade(colour: RGB, factor: float) -> RGB:
    """``colour`` darkened (factor < 1) or lightened towards white (factor > 1)."""
    if factor <= 1:
        return tuple(int(c * factor) for c in colour)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * (factor - 1)) for c in colour)  # type: ignore[return-value]


class _Canvas:
    """Maps design-frame coordinates (64x64, centre 32,32) onto a transformed pixel canvas."""

    def __init__(self, side: int, scale: float, shift: tuple[float, float]) -> None:
        self.side = side
        self.scale = scale
        self.unit = side / _DESIGN
        self.shift = shift
        self.image = Image.new("RGB", (side, side))
        self.draw = ImageDraw.Draw(self.image)

    def pt(self, x: float, y: float) -> tuple[float, float]:
        mid = _DESIGN / 2
        return (
            ((x - mid) * self.scale + mid + self.shift[0]) * self.unit,
            ((y - mid) * self.scale + mid + self.shift[1]) * self.unit,
        )

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.pt(x0, y0), *self.pt(x1, y1)]

    def poly(self, *xy: tuple[float, float]) -> list[tuple[float, float]]:
        return [self.pt(x, y) for x, y in xy]

    def len(self, design_length: float) -> int:
        return max(1, round(design_length * self.scale * self.unit))

    def paint(self, t: Traits) -> None:
        d = self.draw
        skin, hair = SKINS[t.skin], HAIR_COLOURS[t.hair_colour]
        d.rectangle([0, 0, self.side, self.side], fill=BACKGROUNDS[t.background])
        if t.hair_style == "long":
            d.rounded_rectangle(self.box(13, 12, 51, 54), radius=self.len(8), fill=hair)
        self._shirt(t)
        d.rectangle(self.box(27, 38, 37, 50), fill=skin)  # neck
        self._face(t.face_shape, skin)
        self._eyes(EYE_COLOURS[t.eye_colour])
        d.line(self.poly((27, 35), (37, 35)), fill=(150, 40, 40), width=self.len(2))  # mouth
        self._hair(t.hair_style, hair)
        self._accessory(t.accessory)

    def _shirt(self, t: Traits) -> None:
        colour = SHIRT_COLOURS[t.shirt_colour]
        mark = _shade(colour, 0.5) if sum(colour) > 300 else _shade(colour, 1.6)
        layer = Image.new("RGB", self.image.size, colour)
        ld = ImageDraw.Draw(layer)
        if t.shirt_pattern == "stripes":
            for y in range(50, 66, 6):
                ld.rectangle(self.box(0, y, 64, y + 3), fill=mark)
        elif t.shirt_pattern == "dots":
            for row, y in enumerate(range(52, 66, 7)):
                for x in range(8 + 4 * (row % 2), 60, 8):
                    ld.ellipse(self.box(x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=mark)
        elif t.shirt_pattern == "v_neck":
            ld.polygon(self.poly((24, 47), (40, 47), (32, 60)), fill=SKINS[t.skin])
        mask = Image.new("L", self.image.size, 0)
        ImageDraw.Draw(mask).rounded_rectangle(self.box(6, 47, 58, 74), radius=self.len(12), fill=255)
        self.image.paste(layer, mask=mask)

    def _face(self, shape: str, skin: RGB) -> None:
        """The face, outlined so that its shape shows whatever the skin and background colours."""
        style = {"fill": skin, "outline": _OUTLINE, "width": self.len(1.5)}
        if shape == "circle":
            self.draw.ellipse(self.box(16, 10, 48, 44), **style)
        elif shape == "tall_oval":
            self.draw.ellipse(self.box(21, 4, 43, 47), **style)
        elif shape == "square":
            self.draw.rectangle(self.box(14, 10, 50, 44), **style)
        elif shape == "diamond":
            self.draw.polygon(self.poly((32, 6), (50, 26), (32, 47), (14, 26)), **style)
        elif shape == "pear":
            self.draw.polygon(self.poly((23, 9), (41, 9), (51, 45), (13, 45)), **style)
        elif shape == "triangle":
            self.draw.polygon(self.poly((13, 11), (51, 11), (32, 47)), **style)
        else:
            raise ValueError(f"unknown face shape {shape!r}")

    def _eyes(self, iris: RGB) -> None:
        for x in (26, 38):
            self.draw.ellipse(self.box(x - 4.5, 19.5, x + 4.5, 28.5), fill=(255, 255, 255))
            self.draw.ellipse(self.box(x - 3, 21, x + 3, 27), fill=iris)

    def _hair(self, style: str, hair: RGB) -> None:
        d = self.draw
        if style not in HAIR_STYLES:
            raise ValueError(f"unknown hair style {style!r}")
        if style in ("short", "long", "bun"):
            d.pieslice(self.box(15, 5, 49, 31), 180, 360, fill=hair)
        if style == "bun":
            d.ellipse(self.box(25, -1, 39, 13), fill=hair)
        elif style == "spiky":
            for x in range(15, 49, 7):
                d.polygon(self.poly((x, 18), (x + 7, 18), (x + 3.5, 1)), fill=hair)
            d.rectangle(self.box(15, 12, 49, 17), fill=hair)
        elif style == "mohawk":
            d.rectangle(self.box(27, 0, 37, 19), fill=hair)
        elif style == "curly":
            for x, y in ((17, 15), (23, 9), (32, 7), (41, 9), (47, 15), (27, 13), (37, 13)):
                d.ellipse(self.box(x - 6, y - 6, x + 6, y + 6), fill=hair)

    def _accessory(self, accessory: str) -> None:
        d = self.draw
        if accessory == "none":
            return
        if accessory not in _ACCESSORY_COLOURS:
            raise ValueError(f"unknown accessory {accessory!r}")
        colour = _ACCESSORY_COLOURS[accessory]
        if accessory == "glasses":
            for x in (26, 38):  # the two frames touch at x=32, which makes the bridge
                d.rectangle(self.box(x - 6, 18, x + 6, 30), outline=colour, width=self.len(2))
        elif accessory == "earrings":
            for x in (14, 50):
                d.ellipse(self.box(x - 3.5, 31, x + 3.5, 38), fill=colour)
        elif accessory == "bow_tie":
            d.polygon(self.poly((22, 45), (22, 55), (32, 50)), fill=colour)
            d.polygon(self.poly((42, 45), (42, 55), (32, 50)), fill=colour)
        elif accessory == "headband":
            d.rectangle(self.box(14, 14, 50, 18), fill=colour)
        else:  # necklace: gold on a dark cord, visible on any shirt
            d.arc(self.box(18, 34, 46, 60), 20, 160, fill=_OUTLINE, width=self.len(5))
            d.arc(self.box(19, 35, 45, 59), 20, 160, fill=colour, width=self.len(3))
