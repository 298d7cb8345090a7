"""The label-supervised (IDCMR) terms of the table (`terms.TERMS`): their loss and check functions.

They read the batch's multi-hot category labels (`batch["labels"]`, present whenever the dataset
has labels); two examples are similar when they share a category. Our statement of DSCMR's
common-space losses (Zhen et al., CVPR 2019; docs/labels.md says what is the paper's):
- `label_intra_modal`: within each tower, the pairwise NLL log(1 + e^Γ) - S Γ, Γ =
  `label_similarity_scale` x cosine, over the distinct pairs of the global batch, images and texts;
- `label_inter_modal`: the same NLL over every image x text pair of the global batch, plus
  `modality_invariance` x mean ||u_i - v_i||^2 of each example's image and text embeddings.
The math: `label_losses.py`. A dataset without labels (webdataset shards among them) is refused
before any work by `check_label_data`, which the trainer calls once the dataset is open.
"""

from __future__ import annotations

from vlretrieval.errors import UserError

LABEL_TERMS = ("label_intra_modal", "label_inter_modal")


def _labels(inputs):
    if "labels" not in inputs.batch:
        raise ValueError("a label term needs batch['labels']: the trainer refuses data without labels "
                         "(objectives.label_terms.check_label_data)")
    return inputs.batch["labels"]


def label_intra_modal(inputs):
    value = inputs.tower_losses.label_intra_modal_loss(
        *inputs.embeddings, _labels(inputs), inputs.config.label_similarity_scale,
    )
    return value, {}


def label_inter_modal(inputs):
    value = inputs.tower_losses.label_inter_modal_loss(
        *inputs.embeddings, _labels(inputs), inputs.config.label_similarity_scale,
        inputs.config.modality_invariance,
    )
    return value, {}


def check_label_settings(config, setting) -> None:
    if not config.label_similarity_scale > 0:
        raise UserError(f"config.objectives.label_similarity_scale must be above 0, not "
                        f"{config.label_similarity_scale}")
    if not config.modality_invariance >= 0:
        raise UserError(f"config.objectives.modality_invariance must be 0 or more, not {config.modality_invariance}")


def check_label_data(objectives, data) -> None:
    """One line when a label term is on and the training data has no category labels; reads the
    train split's labels (`data.labels`), so a dataset that has none fails here, before any work."""
    on = [name for name in LABEL_TERMS if isinstance(objectives.get(name), (int, float)) and objectives[name] > 0]
    if not on:
        return
    if data.shards is not None:
        raise UserError(f"config.objectives.{on[0]} needs category labels, but webdataset shards carry none: "
                        "train it on a prepared labelled dataset, or set the label terms to 0")
    data.labels("train", f"config.objectives.{on[0]}")
