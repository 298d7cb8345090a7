"""The teacher and hashing terms of the table (`terms.TERMS`): their loss and check functions.

A term's `inputs` is a `terms.TermInputs`, its `setting` a `terms.Setting` (not imported: terms.py
imports this module). The math: `structure_losses.py`; the formulas and JOG's joint teaching:
docs/hashing.md.
- `distillation`: KL(teacher || student) between the row softmaxes at `distillation_temperature`
  of the image x text (both ways), image x image and text x text matrices over the global batch;
- `hash_quantization`: mean (1 - |tanh(h)|)^2 over the hashing heads' outputs (the peer's too);
- `hash_distillation`: `distillation`'s KL with the normalised relaxed codes as the student's
  embeddings (the teacher's ranking structure, not its raw cosines);
- `hash_similarity`: squared error between the relaxed codes' similarity b_i . b_j / K and the
  teacher's cosine similarity (no teacher: the student's own float embeddings'), the targets
  refined by the two students' agreement under joint teaching.
Each matrix weighs `similarity_image_text`, `similarity_image_image`, `similarity_text_text`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlretrieval import structure_losses
from vlretrieval.errors import UserError

SIMILARITY_MATRICES = ("similarity_image_text", "similarity_image_image", "similarity_text_text")


def _matrix_weights(config) -> dict[str, float]:
    return {name.removeprefix("similarity_"): config[name] for name in SIMILARITY_MATRICES}


def _check_matrices(config, on: bool) -> None:
    """The matrix weights: numbers, 0 or more; not all 0 when a term that reads them is `on`."""
    weights = tuple(config[name] for name in SIMILARITY_MATRICES)
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights) or (
            on and not any(weights)):
        raise UserError(f"config.objectives.{', '.join(SIMILARITY_MATRICES)} weigh the similarity matrices: "
                        f"numbers, 0 or more, not all 0 (not {weights})")


def distillation(inputs):
    outputs = inputs.outputs
    value = inputs.tower_losses.similarity_distillation_loss(
        *inputs.embeddings, outputs.get("teacher_image_embeddings"), outputs.get("teacher_text_embeddings"),
        inputs.config.distillation_temperature, **_matrix_weights(inputs.config),
    )
    return value, {}


def check_distillation(config, setting) -> None:
    if config.distillation_temperature <= 0:
        raise UserError(f"config.objectives.distillation_temperature must be above 0, not "
                        f"{config.distillation_temperature}")
    _check_matrices(config, config.distillation > 0)
    if config.distillation > 0 and setting.teacher is None:
        raise UserError("config.objectives.distillation matches a teacher's similarities: set config.distill.teacher "
                        "(a run folder or a folder written by `vlretrieval convert`)")


def _codes(outputs, prefix: str = "", straight_through: bool = False):
    """The relaxed codes tanh(h) of both towers (a student's, or the peer's with prefix "peer_").
    `straight_through`: the codes inference uses, sign(h) (0 is +1), in the forward pass, with
    tanh's gradient in the backward pass (straight-through, as Greedy Hash): the loss then scores
    the very codes that are searched, with no relaxation gap."""
    relaxed = tuple(jnp.tanh(outputs[f"{prefix}{tower}_hash_logits"]) for tower in ("image", "text"))
    if not straight_through:
        return relaxed
    return tuple(code + jax.lax.stop_gradient(jnp.where(code >= 0, 1.0, -1.0) - code) for code in relaxed)


def hash_quantization(inputs):
    outputs = inputs.outputs
    logits = [outputs[f"{prefix}{tower}_hash_logits"] for prefix in ("", "peer_") for tower in ("image", "text")
              if f"{prefix}{tower}_hash_logits" in outputs]
    return structure_losses.quantization_loss(*logits), {}


def hash_similarity(inputs):
    outputs = inputs.outputs
    if "teacher_image_embeddings" in outputs or "teacher_text_embeddings" in outputs:
        targets = outputs.get("teacher_image_embeddings"), outputs.get("teacher_text_embeddings")
    else:  # no teacher: the codes keep the student's own float similarities
        targets = tuple(jax.lax.stop_gradient(x) for x in inputs.embeddings)
    peer = _codes(outputs, "peer_") if "peer_image_hash_logits" in outputs else (None, None)
    value = inputs.tower_losses.hash_similarity_loss(
        *_codes(outputs), *targets, *peer, refinement=inputs.config.joint_teaching_refinement,
        **_matrix_weights(inputs.config),
    )
    return value, {}


def hash_distillation(inputs):
    """`distillation` with the L2-normalised relaxed codes in the student's place (the peer's too,
    under joint teaching): the codes' similarity structure matches the teacher's (or, with no
    teacher, the student's own float embeddings', without gradient)."""
    outputs, config = inputs.outputs, inputs.config
    if "teacher_image_embeddings" in outputs or "teacher_text_embeddings" in outputs:
        targets = outputs.get("teacher_image_embeddings"), outputs.get("teacher_text_embeddings")
    else:
        targets = tuple(jax.lax.stop_gradient(x) for x in inputs.embeddings)
    normalise = lambda codes: codes / jnp.maximum(jnp.linalg.norm(codes, axis=-1, keepdims=True), 1e-6)
    value = 0.0
    for prefix in ("", "peer_") if "peer_image_hash_logits" in outputs else ("",):
        image_codes, text_codes = (normalise(codes) for codes in _codes(outputs, prefix, config.hash_straight_through))
        value += inputs.tower_losses.similarity_distillation_loss(
            image_codes, text_codes, *targets, config.distillation_temperature, **_matrix_weights(config))
    return value, {}


def needs_hashing_head(name: str):
    def check(config, setting) -> None:
        if name in ("hash_similarity", "hash_distillation"):
            _check_matrices(config, config[name] > 0)
            if not 0 <= config.joint_teaching_refinement <= 1:
                raise UserError(f"config.objectives.joint_teaching_refinement must be in [0, 1], not "
                                f"{config.joint_teaching_refinement}")
        if config[name] > 0 and not getattr(setting.model.head, "hash_bits", 0):
            raise UserError(f"config.objectives.{name} trains a hashing head: set config.model.head.hash_bits "
                            "(16, 32, 64 or 128)")

    return check
