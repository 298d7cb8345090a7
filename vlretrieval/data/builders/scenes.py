"""Procedural scenes of coloured shapes for the demo set: sampling, rendering and captions.

Plain numpy, no tensorflow-datasets: the builder in `demo_scenes.py` calls these, and tests can
draw thousands of scenes directly. Every caption names every object's size, colour and shape and,
for two or three objects, their order along one axis, so a caption identifies its scene up to
`description(scene)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

IMAGE_SIZE = 64
LANGUAGES = ("en", "de", "fr", "es")
CAPTIONS_PER_LANGUAGE = 5
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


# ---------------------------------------------------------------------------------------------
# Captions. Each language has an object phrase in the grammatical cases its templates need and,
# per axis, the relation phrases. Templates are `str.format` strings over fields A, B, C (object
# phrases) and the relation fields; the first letter of a caption is capitalised afterwards.

_DE_NOUNS = {
    "circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
    "diamond": ("Raute", "f"), "cross": ("Kreuz", "n"),
}
_DE_ADJECTIVES = {
    "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett",
    "orange": "orangefarben", "white": "weiß", "cyan": "türkis", "small": "klein", "large": "groß",
}
# (case, gender) -> (indefinite article, adjective ending): mixed declension after "ein".
_DE_DECLENSION = {
    ("nom", "m"): ("ein", "er"), ("nom", "n"): ("ein", "es"), ("nom", "f"): ("eine", "e"),
    ("acc", "m"): ("einen", "en"), ("acc", "n"): ("ein", "es"), ("acc", "f"): ("eine", "e"),
    ("dat", "m"): ("einem", "en"), ("dat", "n"): ("einem", "en"), ("dat", "f"): ("einer", "en"),
}
_DE_RELATIVE = {"m": "der", "n": "das", "f": "die"}
_FR_NOUNS = {
    "circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
    "diamond": ("losange", "m"), "cross": ("croix", "f"),
}
_ES_NOUNS = {
    "circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
    "diamond": ("rombo", "m"), "cross": ("cruz", "f"),
}
# value -> (masculine, feminine)
_FR_ADJECTIVES = {
    "red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "orange": ("orange", "orange"),
    "white": ("blanc", "blanche"), "cyan": ("cyan", "cyan"),
    "small": ("petit", "petite"), "large": ("grand", "grande"),
}
_ES_ADJECTIVES = {
    "red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
    "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"),
    "orange": ("naranja", "naranja"), "white": ("blanco", "blanca"), "cyan": ("cian", "cian"),
    "small": ("pequeño", "pequeña"), "large": ("grande", "grande"),
}


@functools.cache  # 80 objects x 4 languages x 3 letters: build each phrase once
def _object_fields(language: str, letter: str, shape: str, colour: str, size: str) -> dict:
    """Template fields for one object: `A` (subject) plus the cases this language needs."""
    if language == "en":
        return {letter: f"a {size} {colour} {shape}"}
    if language == "de":  # "ein großer roter Kreis", "einem großen roten Kreis"
        noun, gender = _DE_NOUNS[shape]
        fields = {f"{letter}_rel": _DE_RELATIVE[gender]}
        for case in ("nom", "acc", "dat"):
            article, end = _DE_DECLENSION[case, gender]
            size_word, colour_word = _DE_ADJECTIVES[size] + end, _DE_ADJECTIVES[colour] + end
            fields[f"{letter}_{case}"] = f"{article} {size_word} {colour_word} {noun}"
        return {letter: fields[f"{letter}_nom"], **fields}
    french = language == "fr"
    noun, gender = (_FR_NOUNS if french else _ES_NOUNS)[shape]
    adjectives, feminine = _FR_ADJECTIVES if french else _ES_ADJECTIVES, gender == "f"
    article = ("une" if french else "una") if feminine else "un"
    size_word, colour_word = adjectives[size][feminine], adjectives[colour][feminine]
    if french:  # size before the noun, colour after: "un grand cercle rouge"
        phrase = f"{article} {size_word} {noun} {colour_word}"
        return {letter: phrase, f"{letter}_de": f"d'{phrase}"}
    return {letter: f"{article} {noun} {colour_word} {size_word}"}  # "un círculo rojo grande"


# language -> axis -> relation fields. `before` relates the first object to the second.
_RELATION_FIELDS = {
    "en": {
        "horizontal": dict(before="to the left of", after="to the right of",
                           start="on the left", end="on the right", order="from left to right"),
        "vertical": dict(before="above", after="below",
                         start="at the top", end="at the bottom", order="from top to bottom"),
    },
    "de": {
        "horizontal": dict(before="links von", after="rechts von",
                           start="links", end="rechts", order="von links nach rechts"),
        "vertical": dict(before="über", after="unter",
                         start="oben", end="unten", order="von oben nach unten"),
    },
    "fr": {
        "horizontal": dict(before="à gauche", after="à droite",
                           start="à gauche", end="à droite", order="de gauche à droite"),
        "vertical": dict(before="au-dessus", after="au-dessous",
                         start="en haut", end="en bas", order="de haut en bas"),
    },
    "es": {
        "horizontal": dict(before="a la izquierda de", after="a la derecha de",
                           start="a la izquierda", end="a la derecha",
                           order="de izquierda a derecha"),
        "vertical": dict(before="encima de", after="debajo de",
                         start="arriba", end="abajo", order="de arriba abajo"),
    },
}

# language -> object count -> six paraphrase templates.
_TEMPLATES = {
    "en": {
        1: ["{A}.", "A picture of {A}.", "{A} on a dark background.",
            "There is {A} in the picture.", "An image showing {A}.", "A dark image with {A}."],
        2: ["{A} {before} {B}.", "{B} {after} {A}.", "{A} is {before} {B}.",
            "A picture of {A} {before} {B}.", "{B} is {after} {A}.", "{A} {start} and {B} {end}."],
        3: ["{A}, {B} and {C}, {order}.", "{order}: {A}, {B} and {C}.",
            "{A} {before} {B}, which is {before} {C}.", "{C} {after} {B}, which is {after} {A}.",
            "Three shapes {order}: {A}, {B} and {C}.", "A picture of {A}, {B} and {C}, {order}."],
    },
    "de": {
        1: ["{A}.", "Ein Bild mit {A_dat}.", "{A} auf dunklem Hintergrund.", "Im Bild ist {A}.",
            "Ein Bild, das {A_acc} zeigt.", "Ein dunkles Bild mit {A_dat}."],
        2: ["{A} {before} {B_dat}.", "{B} {after} {A_dat}.", "{A} befindet sich {before} {B_dat}.",
            "Ein Bild mit {A_dat} {before} {B_dat}.", "{start} {A}, {end} {B}.",
            "{after} {A_dat} ist {B}."],
        3: ["{A}, {B} und {C}, {order}.", "{order}: {A}, {B} und {C}.",
            "{A} {before} {B_dat}, {B_rel} {before} {C_dat} ist.",
            "{C} {after} {B_dat}, {B_rel} {after} {A_dat} ist.",
            "Drei Formen {order}: {A}, {B} und {C}.",
            "Ein Bild mit {A_dat}, {B_dat} und {C_dat}, {order}."],
    },
    "fr": {
        1: ["{A}.", "Une image avec {A}.", "{A} sur un fond sombre.", "Il y a {A} dans l'image.",
            "Une image montrant {A}.", "Une image sombre avec {A}."],
        2: ["{A} {before} {B_de}.", "{B} {after} {A_de}.", "{A} se trouve {before} {B_de}.",
            "Une image avec {A} {before} {B_de}.", "{start}, {A} ; {end}, {B}.",
            "Il y a {B} {after} {A_de}."],
        3: ["{A}, {B} et {C}, {order}.", "{order} : {A}, {B} et {C}.",
            "{A} {before} {B_de}, qui est {before} {C_de}.",
            "{C} {after} {B_de}, qui est {after} {A_de}.",
            "Trois formes {order} : {A}, {B} et {C}.", "Une image avec {A}, {B} et {C}, {order}."],
    },
    "es": {
        1: ["{A}.", "Una imagen con {A}.", "{A} sobre un fondo oscuro.", "Hay {A} en la imagen.",
            "Una imagen que muestra {A}.", "Una imagen oscura con {A}."],
        2: ["{A} {before} {B}.", "{B} {after} {A}.", "{A} está {before} {B}.",
            "Una imagen con {A} {before} {B}.", "{start}, {A}; {end}, {B}.",
            "Hay {B} {after} {A}."],
        3: ["{A}, {B} y {C}, {order}.", "{order}: {A}, {B} y {C}.",
            "{A} {before} {B}, que está {before} {C}.", "{C} {after} {B}, que está {after} {A}.",
            "Tres formas {order}: {A}, {B} y {C}.", "Una imagen con {A}, {B} y {C}, {order}."],
    },
}


def scene_captions(scene: Scene, rng: np.random.Generator) -> dict[str, list[str]]:
    """CAPTIONS_PER_LANGUAGE distinct paraphrases of the scene in each language of LANGUAGES."""
    count = len(scene.objects)
    # One draw for all languages: a random order of the six templates per language.
    choices = rng.random((len(LANGUAGES), len(_TEMPLATES["en"][count]))).argsort(axis=1)
    captions = {}
    for language, chosen in zip(LANGUAGES, choices[:, :CAPTIONS_PER_LANGUAGE].tolist()):
        fields: dict[str, str] = {}
        for letter, obj in zip("ABC", scene.objects):
            fields.update(_object_fields(language, letter, obj.shape, obj.colour, obj.size))
        if scene.axis is not None:
            fields.update(_RELATION_FIELDS[language][scene.axis])
        texts = [_TEMPLATES[language][count][index].format_map(fields) for index in chosen]
        captions[language] = [text[0].upper() + text[1:] for text in texts]
    return captions


# The word naming each relation; every relation phrase above contains one of them.
_RELATION_WORDS = {
    "en": ("left", "right", "above", "below", "top", "bottom"),
    "de": ("links", "rechts", "über", "unter", "oben", "unten"),
    "fr": ("gauche", "droite", "au-dessus", "au-dessous", "haut", "bas"),
    "es": ("izquierda", "derecha", "encima", "debajo", "arriba", "abajo"),
}


def _word_forms(language: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """kind -> value -> the word forms captions in `language` use for it (all genders and cases)."""
    if language == "en":
        adjectives = {value: (value,) for value in [*COLOURS, *SIZES]}
        nouns = {shape: (shape,) for shape in SHAPES}
    elif language == "de":
        endings = sorted({end for _, end in _DE_DECLENSION.values()})
        adjectives = {v: tuple(stem + end for end in endings) for v, stem in _DE_ADJECTIVES.items()}
        nouns = {shape: (noun,) for shape, (noun, _) in _DE_NOUNS.items()}
    else:
        table = _FR_ADJECTIVES if language == "fr" else _ES_ADJECTIVES
        adjectives = {value: tuple(dict.fromkeys(forms)) for value, forms in table.items()}
        noun_table = _FR_NOUNS if language == "fr" else _ES_NOUNS
        nouns = {shape: (noun,) for shape, (noun, _) in noun_table.items()}
    relations = ("left", "right", "above", "below", "top", "bottom")
    return {
        "colour": {colour: adjectives[colour] for colour in COLOURS},
        "shape": nouns,
        "size": {size: adjectives[size] for size in SIZES},
        "relation": {key: (word,) for key, word in zip(relations, _RELATION_WORDS[language])},
    }


# language -> kind -> English value -> word forms, e.g. WORD_FORMS["de"]["colour"]["red"].
WORD_FORMS = {language: _word_forms(language) for language in LANGUAGES}
# language -> kind ("colour", "shape", "size", "relation") -> every word form of that kind, for
# swapping a content word for another of its kind. German adjectives appear only inflected (roter,
# rote, rotes, roten) and some forms hold a hyphen ("au-dessus"): match them as whole words.
CONTENT_WORDS: dict[str, dict[str, list[str]]] = {
    language: {kind: [form for forms in by_value.values() for form in forms]
               for kind, by_value in kinds.items()}
    for language, kinds in WORD_FORMS.items()
}
