"""Zero-shot image classification as CLIP evaluates it: every class name is put into every prompt
template ("a photo of a {}."), the prompts are embedded by the text tower, and a class's embedding
is the re-normalised mean of its prompts' normalised embeddings; each image is then given the
classes whose embeddings are nearest to its own (top-k on the device, `search.top_k`).

Templates files (configs/zero_shot/*.json): {"templates": ["a photo of a {}.", ...]}, optionally
"classes", the prompt names by label, replacing the dataset's (e.g. CLIP's readable ImageNet names
for folders named by WordNet id), and "description", where the templates come from (JSON has no
comments).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vlretrieval import parallel
from vlretrieval.data.image_folder import ClassificationSplit
from vlretrieval.data.pipeline import NormalizedImages
from vlretrieval.data.tokenizer import TextTokenizer
from vlretrieval.errors import UserError, first_line
from vlretrieval.evaluation import search
from vlretrieval.evaluation.evaluate import embed_in_batches, encoders

CLASS_SLOT = "{}"  # where a template takes the class name
DEFAULT_TOP_K = (1, 5)
_TEMPLATE_KEYS = ("templates", "classes", "description")
# Prompts embedded per `embed_in_batches` call: ImageNet's 1,000 classes x 80 templates would
# otherwise gather 80,000 prompt embeddings on the host at once; per call only the classes' means
# are kept.
_PROMPTS_PER_CALL = 8192


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """Prompt templates, each with a `{}` for the class name, and optionally the class names
    prompts use, by label (None: the dataset's)."""

    templates: tuple[str, ...]
    classes: tuple[str, ...] | None = None


def check_templates(templates: Sequence[str], where: str = "the templates") -> tuple[str, ...]:
    """The templates as a tuple; none at all, or one without a `{}`, is a UserError."""
    if isinstance(templates, PromptTemplates):  # its classes would be dropped here without a word
        raise TypeError("pass PromptTemplates.templates, and its .classes (when set) as the class names")
    if isinstance(templates, str) or not all(isinstance(template, str) for template in templates):
        raise UserError(f"{where} must be a list of strings, each with {CLASS_SLOT} for the class name")
    if not templates:
        raise UserError(f"{where} hold no template: give at least one, e.g. \"a photo of a {CLASS_SLOT}.\"")
    for template in templates:
        if CLASS_SLOT not in template:
            raise UserError(f"template {template!r} in {where} has no {CLASS_SLOT} where the class name goes")
    return tuple(templates)


def load_templates(path: str | os.PathLike) -> PromptTemplates:
    """A templates file: a JSON object with "templates", and optionally "classes" and "description"."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read the templates file {path} ({first_line(error)})") from error
    if not isinstance(content, dict) or "templates" not in content:
        raise UserError(f"the templates file {path} must be a JSON object with a \"templates\" list")
    if unknown := sorted(set(content) - set(_TEMPLATE_KEYS)):
        raise UserError(f"the templates file {path} has unknown keys {unknown}; it may have {list(_TEMPLATE_KEYS)}")
    classes = content.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise UserError(f"\"classes\" in the templates file {path} must be a list of class names")
    templates = check_templates(content["templates"], f"the templates file {path}")
    return PromptTemplates(templates, None if not classes else tuple(classes))


def as_templates(templates: PromptTemplates | Sequence[str] | str | os.PathLike) -> PromptTemplates:
    """`PromptTemplates` from itself, a list of templates, or a templates file's path."""
    if isinstance(templates, PromptTemplates):
        return PromptTemplates(check_templates(templates.templates), templates.classes)
    if isinstance(templates, (str, os.PathLike)):
        return load_templates(templates)
    return PromptTemplates(check_templates(list(templates)))


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every (class, template) prompt, class by class: prompt c * len(templates) + t."""
    # `replace`, not `str.format`: a class name or template with other braces stays literal.
    return [template.replace(CLASS_SLOT, name) for name in class_names for template in templates]


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)  # a zero vector stays zero, not NaN


def class_embeddings(
    encode_text: Callable[[jax.Array, jax.Array], jax.Array],
    tokenizer: TextTokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    max_text_length: int,
    batch_size: int,
    mesh: Mesh,
) -> np.ndarray:
    """float32 [classes, dim]: each class's prompts embedded (`embed_in_batches`: sharded over
    every device of every host), L2-normalised, averaged and re-normalised (CLIP's recipe)."""
    templates = check_templates(templates)
    if not len(class_names):
        raise ValueError("no class names to embed")
    classes_per_call = max(1, _PROMPTS_PER_CALL // len(templates))
    per_class = []
    for start in range(0, len(class_names), classes_per_call):
        names = class_names[start : start + classes_per_call]
        token_ids, text_mask = tokenizer.encode(prompts(names, templates), max_text_length)
        embedded = embed_in_batches(encode_text, [token_ids, text_mask], batch_size, mesh).astype(np.float32)
        per_prompt = _normalised(embedded).reshape(len(names), len(templates), -1)
        per_class.append(_normalised(per_prompt.mean(axis=1)))
    return np.concatenate(per_class)


def classify(
    image_embeddings: np.ndarray,
    class_embeddings: np.ndarray,
    labels: np.ndarray,
    top_k: Sequence[int] = DEFAULT_TOP_K,
) -> dict[str, Any]:
    """Top-k accuracies (% of images whose class is among their k best-scoring classes; k is
    capped at the number of classes), the mean over classes of top-1 recall (classes without
    images left out) and the counts. Scores are cosines computed on the device; equal scores go
    to the lower class index, so the result is deterministic."""
    image_embeddings = _normalised(np.asarray(image_embeddings, np.float32))
    class_embeddings = _normalised(np.asarray(class_embeddings, np.float32))
    labels = np.asarray(labels, np.int64)
    _check_classify_inputs(image_embeddings, class_embeddings, labels, top_k)
    num_images, num_classes = len(image_embeddings), len(class_embeddings)
    # search.top_k: one jitted matmul + lax.top_k by blocks (ties to the lower index), the images
    # split over this host's devices; every host holds every embedding, so no other host is needed.
    _, predicted = search.top_k(image_embeddings, class_embeddings, min(max(top_k), num_classes))
    hits = predicted == labels[:, None]  # [images, k]: at most one True per row
    results: dict[str, Any] = {
        f"top{k}": 100.0 * float(np.mean(hits[:, : min(k, num_classes)].any(axis=1))) for k in top_k
    }
    images_per_class = np.bincount(labels, minlength=num_classes)
    correct_per_class = np.bincount(labels, weights=hits[:, 0], minlength=num_classes)
    present = images_per_class > 0
    results["mean_per_class_recall"] = 100.0 * float(np.mean(correct_per_class[present] / images_per_class[present]))
    results["num_images"] = int(num_images)
    results["num_classes"] = int(num_classes)
    return results


def _check_classify_inputs(image_embeddings, class_embeddings, labels, top_k) -> None:
    if image_embeddings.ndim != 2 or class_embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [n, dim]: images {image_embeddings.shape}, "
                         f"classes {class_embeddings.shape}")
    if image_embeddings.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"image embeddings of size {image_embeddings.shape[1]} and class embeddings of size "
                         f"{class_embeddings.shape[1]} cannot be compared")
    if not len(image_embeddings) or not len(class_embeddings):
        raise ValueError("zero-shot classification needs at least one image and one class")
    if labels.shape != (len(image_embeddings),):
        raise ValueError(f"{labels.shape} labels for {len(image_embeddings)} images")
    if labels.min() < 0 or labels.max() >= len(class_embeddings):
        raise ValueError(f"labels must lie in [0, {len(class_embeddings)}): found {labels.min()}..{labels.max()}")
    if not top_k or any(int(k) != k or k < 1 for k in top_k):
        raise ValueError(f"top_k must be positive integers, not {tuple(top_k)}")


def embed_images(model, params, dataset: ClassificationSplit, *, mesh: Mesh, batch_size: int) -> np.ndarray:
    """[images, dim] image-tower embeddings of a split (every host gets all; each embeds its share):
    what `evaluate_zero_shot` takes as `image_embeddings`, so a suite of template sets or class
    name lists embeds a dataset's images once."""
    encode_image, _ = encoders(model, parallel.replicate(params, mesh))
    return embed_in_batches(encode_image, [NormalizedImages(dataset.images)], batch_size, mesh)


def evaluate_zero_shot(
    model,
    params,
    dataset: ClassificationSplit,
    tokenizer: TextTokenizer,
    templates: PromptTemplates | Sequence[str] | str | os.PathLike,
    *,
    mesh: Mesh,
    batch_size: int,
    max_text_length: int,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    image_embeddings: np.ndarray | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `dataset` (`image_folder.load_image_folder` or
    `load_tfds_classification`): `classify`'s results plus the number of templates. The images
    are embedded with the image tower unless `image_embeddings` (`embed_images`) are given; the
    class names are the templates' "classes" if they have them, else the dataset's."""
    templates = as_templates(templates)
    class_names = list(dataset.class_names)
    if templates.classes is not None:
        if len(templates.classes) != len(class_names):
            raise UserError(f"the templates name {len(templates.classes)} classes but {dataset.source} "
                            f"has {len(class_names)}: give one name per class, in label order")
        class_names = list(templates.classes)
    params = parallel.replicate(params, mesh)
    encode_image, encode_text = encoders(model, params)
    if image_embeddings is None:
        image_embeddings = embed_in_batches(encode_image, [NormalizedImages(dataset.images)], batch_size, mesh)
    elif len(image_embeddings) != len(dataset.labels):
        raise ValueError(f"{len(image_embeddings)} image embeddings for {len(dataset.labels)} images")
    per_class = class_embeddings(
        encode_text, tokenizer, class_names, templates.templates, max_text_length, batch_size, mesh
    )
    results = classify(image_embeddings, per_class, dataset.labels, top_k)
    results["num_templates"] = len(templates.templates)
    return results
