"""The objective terms, each declared once: its weight, its math, what it needs, its checks.

A term's weight is `config.objectives.<name>` (0 switches it off) and its value is logged as
`<name>_loss`. Adding a term is one `Term(...)` in `TERMS` plus its loss function: `compose.py`
builds the objective from the table and `checks.py` runs every term's checks before training.

- `contrastive`: symmetric InfoNCE on the towers' embeddings (`contrastive_loss=softmax`), or
  SigLIP's pairwise sigmoid loss with the model's learnable bias (`contrastive_loss=sigmoid`);
- `reweighted_contrastive`: InfoNCE with hard negatives up-weighted by `reweight_beta`;
- `hardest_negative_hinge`: VSE++ hinge against the `hinge_top_k` hardest negatives, `hinge_margin`;
- `text_text`: MURAL's translation task: symmetric InfoNCE between the text tower's embeddings of
  sentence pairs (`batch["bitext_*"]`), at `text_text_temperature` (0 = the learned one), with
  LaBSE's additive `text_text_margin`;
- `image_text_matching`: the joint model's ITM head on positives and on negatives drawn from the
  batch in proportion to their contrastive similarity (ALBEF/VinVL-style hard negatives);
- `masked_language_model`: BERT-style MLM on the text, with the image as context;
- `late_interaction_hinge`: TERAN's hinge over word x region late-interaction scores
  (`late_interaction_aggregation`; `hinge_margin`, `hinge_top_k` as VSE++'s), on the towers'
  token and region states;
- `masked_region_features` / `masked_region_classes`: masked region modelling for region inputs
  (UNITER's MRFR, Unicoder-VL's MOC): `region_mask_probability` of the real regions have their
  features hidden; their joint outputs regress the features / classify the detector's label;
- `distillation`: the frozen teacher's (config.distill.teacher) similarity structure over the
  global batch: KL between row softmaxes at `distillation_temperature` of the image x text,
  image x image and text x text matrices, weighted by `similarity_image_text`,
  `similarity_image_image`, `similarity_text_text` (`losses.similarity_distillation_loss`);
- `hash_quantization`: the hashing head's relaxed bits tanh(h) pushed to +-1,
  mean (1 - |tanh(h)|)^2 (`structure_losses.quantization_loss`), the peer student's too;
- `hash_similarity`: the relaxed codes' similarity b_i . b_j / K matched (squared error) to the
  teacher's cosine similarity (without a teacher, the student's own float embeddings'), the same
  matrix weights; with config.distill.joint_teaching the targets are refined online by the two
  students' agreement (`structure_losses.refined_similarity`, `joint_teaching_refinement`;
  docs/hashing.md);
- `hash_distillation`: `distillation`'s KL with the L2-normalised relaxed codes tanh(h) in the
  student's place: the codes learn the teacher's ranking structure (docs/hashing.md). Their
  functions: `teacher_terms.py`;
- `label_intra_modal` / `label_inter_modal` (IDCMR, our statement of DSCMR's losses; docs/labels.md):
  on the batch's category labels, the pairwise NLL of "shares a category" under sigmoid(
  `label_similarity_scale` x cosine) within each tower / across them, the latter plus
  `modality_invariance` x mean ||u_i - v_i||^2. Their functions: `label_terms.py`;
- `topic_prediction` (TextTopicNet, docs/topics.md): the soft cross-entropy between the topic
  head's predicted distribution of each image and the LDA's topic distribution of its texts
  (`batch["topic_targets"]`). Its functions: `topic_terms.py`.

Tower terms run on the towers' outputs through a `losses.TowerLosses` (the whole batch in one
array, or `parallel.CrossDeviceLosses` over a sharded batch); joint terms run their own joint pass.
Composed bimodal negatives (`COMPOSED_NEGATIVE_SETTINGS`) are extra columns of every tower term
that declares it `needs` them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlretrieval import late_interaction, losses, negatives
from vlretrieval.errors import UserError
from vlretrieval.models.regions import unpack_regions
from vlretrieval.objectives import label_terms, teacher_terms, topic_terms

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
# Settings of the composed negatives, which are inputs of the image-text tower terms, not terms.
COMPOSED_NEGATIVE_SETTINGS = (
    "composed_text_negatives", "text_swap_fraction", "composed_image_negatives", "image_mix_fraction",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the checks know of the run besides its config."""

    model: Any
    mask_id: int | None
    has_content_words: bool
    teacher: Any = None  # `distillation.Teacher` of config.distill, or None


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """Everything a term's loss may read. Tower terms read `outputs` through `tower_losses`;
    joint terms call `joint(*inputs, method=...)` (the model in training mode) with their `rng`."""

    config: ml_collections.ConfigDict  # config.objectives
    outputs: dict[str, jax.Array]  # `Objective.tower_outputs`
    batch: dict[str, jax.Array]
    tower_losses: losses.TowerLosses
    model: Any = None
    joint: Callable | None = None
    rng: jax.Array | None = None
    mask_id: int | None = None
    vocab_size: int = 0

    @property
    def embeddings(self) -> tuple[jax.Array, jax.Array]:
        return self.outputs["image_embeddings"], self.outputs["text_embeddings"]

    @property
    def logit_scale(self) -> jax.Array:
        return self.outputs["logit_scale"]

    def composed_negatives(self) -> dict[str, jax.Array]:
        """The composed negatives' embeddings as the tower losses' keyword arguments."""
        extras = {
            name: self.outputs[name]
            for name in ("extra_text_negatives", "extra_image_negatives")
            if name in self.outputs
        }
        if "extra_text_negatives" in extras:
            extras["extra_text_valid"] = self.batch["negative_valid"]
        return extras


@dataclasses.dataclass(frozen=True)
class Term:
    """One objective term. `loss(inputs) -> (value, extra metrics)`; `uses` is "towers" or "joint";
    `needs` names optional tower outputs ("composed_negatives", "bitext"); `hyperparameters` are
    its other keys in config.objectives; `check(config, setting)` raises `UserError` on a setting
    that cannot run, and is called whether or not the term is on (so a bad value is caught early).
    """

    name: str
    loss: Callable[[TermInputs], tuple[jax.Array, dict[str, jax.Array]]]
    uses: str
    needs: tuple[str, ...] = ()
    hyperparameters: tuple[str, ...] = ()
    check: Callable[[ml_collections.ConfigDict, Setting], None] | None = None


# --- Tower terms ---


def _contrastive(inputs: TermInputs):
    if inputs.config.contrastive_loss == "sigmoid":
        bias = inputs.outputs["logit_bias"]
        return inputs.tower_losses.sigmoid_loss(*inputs.embeddings, inputs.logit_scale, bias), {}
    return inputs.tower_losses.softmax_contrastive_loss(
        *inputs.embeddings, inputs.logit_scale, **inputs.composed_negatives()
    )


def _check_contrastive(config, setting: Setting) -> None:
    if config.contrastive_loss not in CONTRASTIVE_LOSSES:
        raise UserError(
            f"config.objectives.contrastive_loss is {config.contrastive_loss!r}; choose one of "
            f"{CONTRASTIVE_LOSSES}"
        )
    if config.contrastive > 0 and config.contrastive_loss == "sigmoid":
        if not setting.model.head.logit_bias:
            raise UserError(
                "config.objectives.contrastive_loss=sigmoid needs a learnable logit bias: set "
                "config.model.head.logit_bias=true"
            )
        if config.composed_text_negatives or config.composed_image_negatives:
            raise UserError(
                "composed negatives are extra softmax columns; with contrastive_loss=sigmoid use "
                "them with the reweighted_contrastive or hardest_negative_hinge terms only"
            )


def _reweighted_contrastive(inputs: TermInputs):
    value = inputs.tower_losses.reweighted_contrastive_loss(
        *inputs.embeddings, inputs.logit_scale, inputs.config.reweight_beta,
        **inputs.composed_negatives(),
    )
    return value, {}


def _hardest_negative_hinge(inputs: TermInputs):
    value = inputs.tower_losses.hardest_negative_hinge_loss(
        *inputs.embeddings, inputs.config.hinge_margin, top_k=inputs.config.hinge_top_k,
        **inputs.composed_negatives(),
    )
    return value, {}


def _check_hinge(config, setting: Setting) -> None:
    if config.hinge_top_k < 1:
        raise UserError(f"config.objectives.hinge_top_k must be at least 1, not {config.hinge_top_k}")


def _late_interaction_hinge(inputs: TermInputs):
    outputs, config = inputs.outputs, inputs.config
    value = inputs.tower_losses.late_interaction_hinge_loss(
        outputs["word_embeddings"], outputs["word_mask"], outputs["region_embeddings"], outputs["region_mask"],
        config.hinge_margin, aggregation=config.late_interaction_aggregation, top_k=config.hinge_top_k,
    )
    return value, {}


def _check_late_interaction(config, setting: Setting) -> None:
    if config.late_interaction_aggregation not in late_interaction.AGGREGATIONS:
        raise UserError(f"config.objectives.late_interaction_aggregation is {config.late_interaction_aggregation!r}; "
                        f"choose one of {late_interaction.AGGREGATIONS}")
    if config.late_interaction_hinge > 0 and (config.composed_text_negatives or config.composed_image_negatives):
        raise UserError("config.objectives.late_interaction_hinge scores word x region states; composed "
                        "negatives are pooled embeddings only: switch them off or the term")
    _check_hinge(config, setting)


def _text_text(inputs: TermInputs):
    config = inputs.config
    scale = inputs.logit_scale if config.text_text_temperature == 0 else 1.0 / config.text_text_temperature
    value, accuracies = inputs.tower_losses.softmax_contrastive_loss(
        inputs.outputs["bitext_source_embeddings"], inputs.outputs["bitext_target_embeddings"], scale,
        positive_margin=config.text_text_margin,
    )
    return value, {
        "source_to_target_accuracy": accuracies["image_to_text_accuracy"],
        "target_to_source_accuracy": accuracies["text_to_image_accuracy"],
    }


def _check_text_text(config, setting: Setting) -> None:
    if config.text_text_temperature < 0 or config.text_text_margin < 0:
        raise UserError("config.objectives.text_text_temperature and text_text_margin must not be negative")


# --- Joint terms ---


def _needs_joint_model(name: str):
    def check(config, setting: Setting) -> None:
        if config[name] > 0 and not hasattr(setting.model, "joint_forward"):
            raise UserError(
                f"config.objectives.{name} needs the joint model (config.model.kind=decomposed)"
            )

    return check


def _image_text_matching(inputs: TermInputs):
    # Negatives drawn in proportion to softmax(similarity / T): the pairs the towers confuse.
    # T = 0 uses the towers' own learned temperature (ALBEF), which from scratch gives only
    # near-duplicates, too hard for an ITM head that has learned nothing yet.
    config, batch, model = inputs.config, inputs.batch, inputs.model
    temperature = config.itm_sampling_temperature
    scale = inputs.logit_scale if temperature == 0 else 1.0 / temperature
    similarity = jax.lax.stop_gradient(losses.similarity_logits(*inputs.embeddings, scale))
    text_rng, image_rng = jax.random.split(inputs.rng)
    negative_text = negatives.sample_by_similarity(text_rng, similarity)  # per image
    negative_image = negatives.sample_by_similarity(image_rng, similarity.T)  # per text
    images, token_ids, text_mask = batch["images"], batch["token_ids"], batch["text_mask"]
    pair_ids = jnp.concatenate([token_ids, token_ids[negative_text], token_ids])
    pair_mask = jnp.concatenate([text_mask, text_mask[negative_text], text_mask])
    pair_images = jnp.concatenate([images, images, images[negative_image]])
    batch_size = images.shape[0]
    labels = jnp.concatenate([jnp.ones(batch_size, jnp.int32), jnp.zeros(2 * batch_size, jnp.int32)])
    joint = inputs.joint(pair_ids, pair_mask, pair_images, method=model.joint_forward)
    value, accuracy = losses.matching_loss(joint["itm_logits"], labels)
    return value, {"image_text_matching_accuracy": accuracy}


def mask_tokens(
    rng: jax.Array,
    token_ids: jax.Array,
    text_mask: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    probability: float,
    first_ordinary_id: int = 5,
) -> tuple[jax.Array, jax.Array]:
    """BERT masking: of the chosen tokens 80% become [MASK], 10% a random token, 10% stay.

    Never chooses padding, the first token ([CLS]) or the last real one ([SEP]).
    Returns (masked ids, bool [batch, length] of chosen positions).
    """
    choose_rng, action_rng, token_rng = jax.random.split(rng, 3)
    positions = jnp.arange(token_ids.shape[1])[None, :]
    lengths = text_mask.sum(axis=1, keepdims=True)
    maskable = (text_mask == 1) & (positions > 0) & (positions < lengths - 1)
    chosen = maskable & (jax.random.uniform(choose_rng, token_ids.shape) < probability)
    action = jax.random.uniform(action_rng, token_ids.shape)
    random_tokens = jax.random.randint(token_rng, token_ids.shape, first_ordinary_id, vocab_size)
    masked = jnp.where(action < 0.8, mask_id, jnp.where(action < 0.9, random_tokens, token_ids))
    return jnp.where(chosen, masked, token_ids).astype(token_ids.dtype), chosen


def _masked_language_model(inputs: TermInputs):
    batch = inputs.batch
    token_ids, text_mask = batch["token_ids"], batch["text_mask"]
    masked_ids, chosen = mask_tokens(
        inputs.rng, token_ids, text_mask, mask_id=inputs.mask_id, vocab_size=inputs.vocab_size,
        probability=inputs.config.mlm_probability,
    )
    joint = inputs.joint(masked_ids, text_mask, batch["images"], method=inputs.model.joint_forward)
    value, accuracy = losses.masked_language_model_loss(joint["mlm_logits"], token_ids, chosen)
    return value, {"masked_language_model_accuracy": accuracy}


def _check_masked_language_model(config, setting: Setting) -> None:
    _needs_joint_model("masked_language_model")(config, setting)
    if config.masked_language_model > 0 and setting.mask_id is None:
        raise UserError("config.objectives.masked_language_model needs a tokenizer with a mask token")
    if not 0 < config.mlm_probability <= 1:
        raise UserError(
            f"config.objectives.mlm_probability must be in (0, 1], not {config.mlm_probability}"
        )


def choose_regions(rng: jax.Array, images: jax.Array, probability: float) -> jax.Array:
    """bool [batch, regions]: each real region chosen with `probability` (padding never)."""
    _, _, real, _ = unpack_regions(images)
    return (real > 0) & (jax.random.uniform(rng, real.shape) < probability)


def _masked_region_pass(inputs: TermInputs):
    """The joint pass over (caption, regions with some features hidden): (outputs, chosen)."""
    batch = inputs.batch
    chosen = choose_regions(inputs.rng, batch["images"], inputs.config.region_mask_probability)
    joint = inputs.joint(batch["token_ids"], batch["text_mask"], batch["images"], mask_regions=chosen,
                         method=inputs.model.joint_forward)
    return joint, chosen


def _masked_region_features(inputs: TermInputs):
    joint, chosen = _masked_region_pass(inputs)
    features, _, _, _ = unpack_regions(inputs.batch["images"])
    return losses.masked_region_feature_loss(joint["region_features"], features, chosen), {}


def _masked_region_classes(inputs: TermInputs):
    joint, chosen = _masked_region_pass(inputs)
    _, _, _, labels = unpack_regions(inputs.batch["images"])
    value, accuracy = losses.masked_region_class_loss(joint["region_class_logits"], labels, chosen)
    return value, {"masked_region_classes_accuracy": accuracy}


def _check_masked_regions(name: str):
    def check(config, setting: Setting) -> None:
        if not 0 < config.region_mask_probability <= 1:
            raise UserError(f"config.objectives.region_mask_probability must be in (0, 1], "
                            f"not {config.region_mask_probability}")
        if config[name] <= 0:
            return
        _needs_joint_model(name)(config, setting)
        joint = setting.model.config
        if joint.image_input != "regions":
            raise UserError(f"config.objectives.{name} masks detector regions: it needs "
                            "config.model.image_input=regions")
        if name == "masked_region_classes" and not joint.region_classes:
            raise UserError("config.objectives.masked_region_classes needs the number of region classes: "
                            "set config.model.regions.classes")

    return check


# The table. Tower terms are summed in this order, then the joint terms.
TERMS = (
    Term("text_text", _text_text, "towers", needs=("bitext",),
         hyperparameters=("text_text_temperature", "text_text_margin"), check=_check_text_text),
    Term("contrastive", _contrastive, "towers", needs=("composed_negatives",),
         hyperparameters=("contrastive_loss",), check=_check_contrastive),
    Term("reweighted_contrastive", _reweighted_contrastive, "towers", needs=("composed_negatives",),
         hyperparameters=("reweight_beta",)),
    Term("hardest_negative_hinge", _hardest_negative_hinge, "towers", needs=("composed_negatives",),
         hyperparameters=("hinge_margin", "hinge_top_k"), check=_check_hinge),
    Term("late_interaction_hinge", _late_interaction_hinge, "towers", needs=("sequences",),
         hyperparameters=("late_interaction_aggregation", "hinge_margin", "hinge_top_k"),
         check=_check_late_interaction),
    Term("distillation", teacher_terms.distillation, "towers",
         hyperparameters=("distillation_temperature", *teacher_terms.SIMILARITY_MATRICES),
         check=teacher_terms.check_distillation),
    Term("hash_quantization", teacher_terms.hash_quantization, "towers",
         check=teacher_terms.needs_hashing_head("hash_quantization")),
    Term("hash_similarity", teacher_terms.hash_similarity, "towers",
         hyperparameters=(*teacher_terms.SIMILARITY_MATRICES, "joint_teaching_refinement"),
         check=teacher_terms.needs_hashing_head("hash_similarity")),
    Term("hash_distillation", teacher_terms.hash_distillation, "towers",
         hyperparameters=("distillation_temperature", *teacher_terms.SIMILARITY_MATRICES, "hash_straight_through"),
         check=teacher_terms.needs_hashing_head("hash_distillation")),
    Term("label_intra_modal", label_terms.label_intra_modal, "towers",
         hyperparameters=("label_similarity_scale",), check=label_terms.check_label_settings),
    Term("label_inter_modal", label_terms.label_inter_modal, "towers",
         hyperparameters=("label_similarity_scale", "modality_invariance"), check=label_terms.check_label_settings),
    Term("topic_prediction", topic_terms.topic_prediction, "towers", check=topic_terms.check_topic_prediction),
    Term("image_text_matching", _image_text_matching, "joint",
         hyperparameters=("itm_sampling_temperature",), check=_needs_joint_model("image_text_matching")),
    Term("masked_language_model", _masked_language_model, "joint",
         hyperparameters=("mlm_probability",), check=_check_masked_language_model),
    Term("masked_region_features", _masked_region_features, "joint",
         hyperparameters=("region_mask_probability",), check=_check_masked_regions("masked_region_features")),
    Term("masked_region_classes", _masked_region_classes, "joint",
         hyperparameters=("region_mask_probability",), check=_check_masked_regions("masked_region_classes")),
)
