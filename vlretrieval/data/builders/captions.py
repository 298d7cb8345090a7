"""Captions of demo scenes in five languages, their translations, and their content words.

Every caption names every object's size, colour and shape and, for two or three objects, their
order along one axis, so a caption identifies its scene up to `scenes.description(scene)`. The six
paraphrase templates of each object count are parallel across languages (template i says the same
thing in each), which is what makes `translation_pair` a translation.
"""

from __future__ import annotations

import functools

import numpy as np

from vlretrieval.data.builders.scenes import COLOURS, SHAPES, SIZES, Scene

LANGUAGES = ("en", "de", "fr", "es", "it")
# The demo's low-resource language: captions only for evaluation (validation and test), never for
# training; what the model learns of it comes from translation pairs with English (MURAL).
LOW_RESOURCE_LANGUAGE = "it"
CAPTIONS_PER_LANGUAGE = 5


# Each language has an object phrase in the grammatical cases its templates need and,
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
_IT_NOUNS = {
    "circle": ("cerchio", "m"), "square": ("quadrato", "m"), "triangle": ("triangolo", "m"),
    "diamond": ("rombo", "m"), "cross": ("croce", "f"),
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
_IT_ADJECTIVES = {
    "red": ("rosso", "rossa"), "green": ("verde", "verde"), "blue": ("blu", "blu"),
    "yellow": ("giallo", "gialla"), "purple": ("viola", "viola"),
    "orange": ("arancione", "arancione"), "white": ("bianco", "bianca"), "cyan": ("ciano", "ciano"),
    "small": ("piccolo", "piccola"), "large": ("grande", "grande"),
}
# Romance languages: (nouns, adjectives, masculine and feminine article, size before the noun).
_ROMANCE = {
    "fr": (_FR_NOUNS, _FR_ADJECTIVES, ("un", "une"), True),
    "es": (_ES_NOUNS, _ES_ADJECTIVES, ("un", "una"), False),
    "it": (_IT_NOUNS, _IT_ADJECTIVES, ("un", "una"), True),
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
    nouns, adjectives, articles, size_first = _ROMANCE[language]
    noun, gender = nouns[shape]
    feminine = gender == "f"
    article = articles[feminine]
    size_word, colour_word = adjectives[size][feminine], adjectives[colour][feminine]
    if size_first:  # "un grand cercle rouge", "un piccolo cerchio rosso"
        phrase = f"{article} {size_word} {noun} {colour_word}"
    else:  # "un círculo rojo grande"
        phrase = f"{article} {noun} {colour_word} {size_word}"
    if language == "fr":
        return {letter: phrase, f"{letter}_de": f"d'{phrase}"}
    return {letter: phrase}


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
    "it": {
        "horizontal": dict(before="a sinistra di", after="a destra di",
                           start="a sinistra", end="a destra", order="da sinistra a destra"),
        "vertical": dict(before="sopra", after="sotto",
                         start="in alto", end="in basso", order="dall'alto in basso"),
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
    "it": {
        1: ["{A}.", "Un'immagine con {A}.", "{A} su uno sfondo scuro.", "C'è {A} nell'immagine.",
            "Un'immagine che mostra {A}.", "Un'immagine scura con {A}."],
        2: ["{A} {before} {B}.", "{B} {after} {A}.", "{A} si trova {before} {B}.",
            "Un'immagine con {A} {before} {B}.", "{start}, {A}; {end}, {B}.",
            "C'è {B} {after} {A}."],
        3: ["{A}, {B} e {C}, {order}.", "{order}: {A}, {B} e {C}.",
            "{A} {before} {B}, che è {before} {C}.", "{C} {after} {B}, che è {after} {A}.",
            "Tre forme {order}: {A}, {B} e {C}.", "Un'immagine con {A}, {B} e {C}, {order}."],
    },
}


def _caption(scene: Scene, language: str, template: int) -> str:
    fields: dict[str, str] = {}
    for letter, obj in zip("ABC", scene.objects):
        fields.update(_object_fields(language, letter, obj.shape, obj.colour, obj.size))
    if scene.axis is not None:
        fields.update(_RELATION_FIELDS[language][scene.axis])
    text = _TEMPLATES[language][len(scene.objects)][template].format_map(fields)
    return text[0].upper() + text[1:]


def scene_captions(
    scene: Scene, rng: np.random.Generator, languages: tuple[str, ...] = LANGUAGES
) -> dict[str, list[str]]:
    """CAPTIONS_PER_LANGUAGE distinct paraphrases of the scene in each of `languages`."""
    count = len(scene.objects)
    # One draw for all languages: a random order of the six templates per language.
    choices = rng.random((len(languages), len(_TEMPLATES["en"][count]))).argsort(axis=1)
    return {
        language: [_caption(scene, language, index) for index in chosen]
        for language, chosen in zip(languages, choices[:, :CAPTIONS_PER_LANGUAGE].tolist())
    }


def translation_pair(scene: Scene, rng: np.random.Generator, source: str, target: str):
    """A caption of `scene` in `source` and its translation in `target`: the same template, whose
    paraphrases are parallel across languages (template i says the same thing in each)."""
    template = int(rng.integers(len(_TEMPLATES["en"][len(scene.objects)])))
    return _caption(scene, source, template), _caption(scene, target, template)


# The word naming each relation; every relation phrase above contains one of them.
_RELATION_WORDS = {
    "en": ("left", "right", "above", "below", "top", "bottom"),
    "de": ("links", "rechts", "über", "unter", "oben", "unten"),
    "fr": ("gauche", "droite", "au-dessus", "au-dessous", "haut", "bas"),
    "es": ("izquierda", "derecha", "encima", "debajo", "arriba", "abajo"),
    "it": ("sinistra", "destra", "sopra", "sotto", "alto", "basso"),
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
        noun_table, table, _, _ = _ROMANCE[language]
        adjectives = {value: tuple(dict.fromkeys(forms)) for value, forms in table.items()}
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
