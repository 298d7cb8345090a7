"""Procedural scenes of coloured shapes for the demo set: sampling and rendering.

Plain numpy, no tensorflow-datasets: the builder in `demo_scenes.py` calls these, and tests can
draw thousands of scenes directly. `captions.py` describes them in words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # name -> RGB, far apart from each other and from the dark background
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245),
    "yellow": (240, 225, 40), "purple": (160, 60, 220), "orange": (250, 140, 20),
    "white": (245, 245, 245), "cyan": (40, 225, 235),
}
# Half-extent in pixels: every shape fits a (2r+1)^2 box, so boxes decide overlap.
SIZES = {"small": 6, "large": 11}
AXES = ("horizontal", "vertical")
# Mostly two or three objects: with one object there are only 80 distinct scenes.
OBJECT_COUNT_PROBABILITIES = (0.15, 0.45, 0.40)

# Background: dark, with grey speckle within +-4 of it on 15% of pixels, far from any object
# colour. Sparse rather than on every pixel because tfds zlib-compresses each image, and dense
# noise costs 2x the disk and 5x the compression time. A pixel draws a row of this table: the
# first 9 rows are the speckle levels, the rest plain background.
_BACKGROUND = np.array([16, 18, 26])
_SPECKLE = np.arange(-4, 5)[:, None]
_PLAIN_ROWS = round(len(_SPECKLE) / 0.15) - len(_SPECKLE)
_PIXEL_TABLE = np.concatenate(
    [_BACKGROUND + _SPECKLE, np.repeat(_BACKGROUND[None], _PLAIN_ROWS, axis=0)]
).astype(np.uint8)
_MIN_GAP = 2  # pixels of background between object boxes
_MIN_ORDER_STEP = 12  # along-axis distance between neighbours so the order is plain to see
_CHUNK = 512  # scenes drawn per vectorised batch
_TRIES = 16  # candidate layouts per scene per round


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape in a scene: its attributes and the pixel coordinates of its centre."""

    shape: str
    colour: str
    size: str
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects in order along `axis` (left to right, or top to bottom); axis None for one object."""

    objects: tuple[SceneObject, ...]
    axis: str | None


def _shape_mask(shape: str, radius: int) -> np.ndarray:
    """Boolean (2r+1, 2r+1) mask of a shape centred in its box, from a coordinate grid."""
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float32)
    r = float(radius)
    if shape == "circle":
        return dx * dx + dy * dy <= (r + 0.3) ** 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (np.abs(dx) <= (dy + r) / 2 + 0.5) & (dy <= 0.8 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


# Masks are stamped into images, so they are computed once per (shape, size).
_MASKS = {(s, z): _shape_mask(s, r) for s in SHAPES for z, r in SIZES.items()}
_COLOUR_VALUES = {name: np.array(rgb, np.uint8) for name, rgb in COLOURS.items()}


def _try_layouts(rng: np.random.Generator, radii: np.ndarray) -> tuple[np.ndarray, ...]:
    """Draws _TRIES candidate layouts for each of m scenes of n objects (radii [m, n]).

    Returns along, across, object order (each [m, tries, n], sorted along the axis) and ok
    [m, tries]. Rejection sampling in numpy, for all scenes of a chunk at once.
    """
    radii = np.broadcast_to(radii[:, None, :], (radii.shape[0], _TRIES, radii.shape[1]))
    along = rng.integers(radii + 1, IMAGE_SIZE - 1 - radii)  # keep a 1-pixel border
    order = np.argsort(along, axis=-1, kind="stable")
    along = np.take_along_axis(along, order, axis=-1)
    radii = np.take_along_axis(radii, order, axis=-1)
    lows, highs = radii + 1, IMAGE_SIZE - 2 - radii
    step = np.diff(along, axis=-1)
    need = radii[..., 1:] + radii[..., :-1] + _MIN_GAP  # boxes must be this far apart on some axis
    if radii.shape[-1] == 2:
        # The one relation must be plainly along the axis: apart along it, drift at most 1/2.
        ok = (step >= need).all(axis=-1)
        min_drift, max_drift = np.zeros_like(step), step // 2
    else:
        # A chain may zig-zag across (so three large shapes fit in 64 pixels), but each neighbour
        # is clearly further along, and no more than 1.5x as far across.
        min_drift, max_drift = np.where(step >= need, 0, need), (3 * step) // 2
        ok = ((step >= _MIN_ORDER_STEP) & (min_drift <= max_drift)).all(axis=-1)
    # Drawing each neighbour's drift inside its allowed range (rather than drawing positions and
    # rejecting) keeps the acceptance rate high for crowded layouts. In a chain of three the two
    # ends are >= 24 pixels apart along the axis, so neighbours are the only pairs to check.
    span = np.maximum(max_drift - min_drift, 0) + 1
    drift = min_drift + (rng.random(step.shape) * span).astype(int)
    drift *= rng.choice(np.array([-1, 1]), size=step.shape)
    first = rng.integers(lows[..., :1], highs[..., :1] + 1)
    across = np.concatenate([first, first + np.cumsum(drift, axis=-1)], axis=-1)
    ok &= ((across >= lows) & (across <= highs)).all(axis=-1)
    return along, across, order, ok


def _place(rng: np.random.Generator, radii: np.ndarray) -> np.ndarray:
    """Layouts [m, n, 3] of (along, across, object index) rows, sorted along the axis."""
    placed = np.zeros((*radii.shape, 3), np.int64)
    pending = np.arange(radii.shape[0])
    while pending.size:  # every attribute combination fits, so each round places most scenes
        along, across, order, ok = _try_layouts(rng, radii[pending])
        found, first = ok.any(axis=1), ok.argmax(axis=1)
        rows = np.flatnonzero(found)
        placed[pending[rows]] = np.stack(
            [a[rows, first[rows]] for a in (along, across, order)], axis=-1
        )
        pending = pending[~found]
    return placed


def _sample_chunk(rng: np.random.Generator, size: int) -> list[Scene]:
    """Draws `size` independent scenes, vectorised over scenes."""
    counts = rng.choice(3, size=size, p=OBJECT_COUNT_PROBABILITIES) + 1
    shapes = rng.integers(len(SHAPES), size=(size, 3))
    colours = rng.integers(len(COLOURS), size=(size, 3))
    sizes = rng.integers(len(SIZES), size=(size, 3))
    axes = rng.integers(len(AXES), size=size)
    colour_names, size_names = list(COLOURS), list(SIZES)
    radius_of = np.array(list(SIZES.values()))
    drawn: list[Scene] = [None] * size  # type: ignore[list-item]  # every slot is filled below
    for count in (1, 2, 3):
        members = np.flatnonzero(counts == count)
        placed = _place(rng, radius_of[sizes[members, :count]])
        for i, layout in zip(members.tolist(), placed.tolist()):
            horizontal = AXES[axes[i]] == "horizontal"
            objects = tuple(
                SceneObject(
                    SHAPES[shapes[i, k]], colour_names[colours[i, k]], size_names[sizes[i, k]],
                    x=along if horizontal else across, y=across if horizontal else along,
                )
                for along, across, k in layout
            )
            drawn[i] = Scene(objects, AXES[axes[i]] if count > 1 else None)
    return drawn


def sample_scenes(rng: np.random.Generator, count: int, unique: bool = False) -> Iterator[Scene]:
    """Yields `count` random scenes; with `unique`, skips any whose description was already used.

    Unique descriptions make retrieval evaluation exact: each caption has one correct image.
    Scenes are drawn in fixed-size chunks, so the stream depends only on the generator's state.
    """
    seen: set[str] = set()
    produced = 0
    while produced < count:
        for scene in _sample_chunk(rng, _CHUNK):
            if unique:
                key = description(scene)
                if key in seen:
                    continue
                seen.add(key)
            yield scene
            produced += 1
            if produced == count:
                return


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draws the scene as a uint8 [64, 64, 3] image: speckled dark background, flat shapes."""
    rows = rng.integers(len(_PIXEL_TABLE), size=(IMAGE_SIZE, IMAGE_SIZE))
    image = np.take(_PIXEL_TABLE, rows, axis=0)
    for obj in scene.objects:
        radius = SIZES[obj.size]
        box = image[obj.y - radius : obj.y + radius + 1, obj.x - radius : obj.x + radius + 1]
        np.copyto(box, _COLOUR_VALUES[obj.colour], where=_MASKS[obj.shape, obj.size][..., None])
    return image


def description(scene: Scene) -> str:
    """Language-independent identity of a scene: equal exactly when captions can mean the same."""
    names = ", ".join(f"{o.size} {o.colour} {o.shape}" for o in scene.objects)
    if scene.axis is None:
        return names
    return f"{'left-to-right' if scene.axis == 'horizontal' else 'top-to-bottom'}: {names}"
