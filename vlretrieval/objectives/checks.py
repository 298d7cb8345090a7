"""The objectives' checks, run before anything is built: the table's own and the general ones."""

from __future__ import annotations

import numbers

import ml_collections

from vlretrieval.errors import UserError
from vlretrieval.objectives.terms import COMPOSED_NEGATIVE_SETTINGS, TERMS, Setting, Term


def check_objectives(
    config: ml_collections.ConfigDict, model, mask_id: int | None, has_content_words: bool,
    terms: tuple[Term, ...] = TERMS, teacher=None,
) -> None:
    """Fail early on objectives that cannot run: an unknown key, a negative or missing weight,
    nothing to train, or a term's own check (a joint term on a model with no joint pass, a
    teacher term with no `teacher` (`distillation.Teacher`)...)."""
    known = {term.name for term in terms}
    known.update(key for term in terms for key in term.hyperparameters)
    known.update(COMPOSED_NEGATIVE_SETTINGS)
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise UserError(
            f"config.objectives.{unknown[0]} is not an objective term or setting; the terms are "
            f"{', '.join(term.name for term in terms)}"
        )
    for term in terms:
        weight = config.get(term.name)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
            raise UserError(
                f"config.objectives.{term.name} is a weight: a number, 0 or more (not {weight!r})"
            )
    if not any(config[term.name] > 0 for term in terms):
        raise UserError("every config.objectives weight is 0: nothing to train")
    setting = Setting(model, mask_id, has_content_words, teacher)
    for term in terms:
        if term.check is not None:
            term.check(config, setting)
    if config.composed_image_negatives and getattr(model, "image_input", "patches") == "regions":
        raise UserError(
            "config.objectives.composed_image_negatives mixes image patches; with "
            "config.model.image_input=regions there are none: switch it off"
        )
    if config.composed_text_negatives and not has_content_words:
        raise UserError(
            "config.objectives.composed_text_negatives needs the dataset's content-word lists "
            "(the demo set has them); switch it off for this dataset"
        )
