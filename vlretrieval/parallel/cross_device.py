"""Cross-device tower losses: the global batch's negatives on every device, exact gradients.

Softmax and sigmoid walk the rings of `ring.py` (one b x b block live per device); the
hard-negative terms score the local rows against all-gathered columns with the row math of
`losses.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlretrieval import label_losses, late_interaction, losses, structure_losses
from vlretrieval.parallel.mesh import DATA_AXIS
from vlretrieval.parallel.ring import ring_sigmoid, ring_softmax_direction, shard_map


def _valid(keys: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    return jnp.ones(keys.shape[0], keys.dtype) if valid is None else valid.astype(keys.dtype)


class CrossDeviceLosses:
    """`losses.TowerLosses` over a batch sharded on `data`: the same values as `losses.py`'s.

    Negatives are the whole global batch: softmax and sigmoid walk the ring (memory O(b x b) per
    device); the hard-negative terms gather every device's embeddings (and composed negatives) as
    columns and score the local rows against them (memory O(b x B)); `all_gather`'s gradient is a
    reduce-scatter, so each device's embeddings get the gradient of every device's rows.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._softmax_direction = ring_softmax_direction(mesh)
        self._sigmoid = ring_sigmoid(mesh)

    def softmax_contrastive_loss(
        self, image_embeddings, text_embeddings, logit_scale,
        extra_text_negatives=None, extra_image_negatives=None, extra_text_valid=None,
        positive_margin=0.0,
    ):
        margin = jnp.asarray(positive_margin, image_embeddings.dtype)
        text_sets = ((text_embeddings, _valid(text_embeddings)),)
        if extra_text_negatives is not None:
            text_sets += ((extra_text_negatives, _valid(extra_text_negatives, extra_text_valid)),)
        image_sets = ((image_embeddings, _valid(image_embeddings)),)
        if extra_image_negatives is not None:
            image_sets += ((extra_image_negatives, _valid(extra_image_negatives)),)
        image_to_text, image_accuracy = self._softmax_direction(
            image_embeddings, text_sets, logit_scale, margin
        )
        text_to_image, text_accuracy = self._softmax_direction(
            text_embeddings, image_sets, logit_scale, margin
        )
        metrics = {"image_to_text_accuracy": image_accuracy, "text_to_image_accuracy": text_accuracy}
        return (image_to_text + text_to_image) / 2, metrics

    def sigmoid_loss(self, image_embeddings, text_embeddings, logit_scale, logit_bias):
        return self._sigmoid(image_embeddings, text_embeddings, logit_scale, logit_bias)

    def _gathered_both_directions(self, rows_loss, embeddings, hyperparameters, **options):
        """Mean over the global batch of `rows_loss` both ways, local rows x gathered columns."""

        def local(image_rows, text_rows, extra_texts, extra_valid, extra_images, *values):
            gather = lambda x: None if x is None else jax.lax.all_gather(x, DATA_AXIS, tiled=True)
            first = jax.lax.axis_index(DATA_AXIS) * image_rows.shape[0]
            image_to_text = rows_loss(
                image_rows, gather(text_rows), *values, first_positive=first,
                extra_keys=gather(extra_texts), extra_valid=gather(extra_valid), **options,
            )
            text_to_image = rows_loss(
                text_rows, gather(image_rows), *values, first_positive=first,
                extra_keys=gather(extra_images), **options,
            )
            total_rows = image_rows.shape[0] * jax.lax.psum(1, DATA_AXIS)
            return jax.lax.psum(image_to_text + text_to_image, DATA_AXIS) / (2 * total_rows)

        data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()
        in_specs = (data,) * len(embeddings) + (whole,) * len(hyperparameters)
        return shard_map(local, self.mesh, in_specs, whole)(*embeddings, *hyperparameters)

    def reweighted_contrastive_loss(
        self, image_embeddings, text_embeddings, logit_scale, beta,
        extra_text_negatives=None, extra_image_negatives=None, extra_text_valid=None,
    ):
        embeddings = (image_embeddings, text_embeddings, extra_text_negatives, extra_text_valid,
                      extra_image_negatives)
        return self._gathered_both_directions(
            losses.reweighted_rows_loss, embeddings, (jnp.asarray(logit_scale), jnp.asarray(beta))
        )

    def hardest_negative_hinge_loss(
        self, image_embeddings, text_embeddings, margin,
        extra_text_negatives=None, extra_image_negatives=None, extra_text_valid=None, top_k=1,
    ):
        embeddings = (image_embeddings, text_embeddings, extra_text_negatives, extra_text_valid,
                      extra_image_negatives)
        return self._gathered_both_directions(
            losses.hinge_rows_loss, embeddings, (jnp.asarray(margin),), top_k=top_k
        )

    def late_interaction_hinge_loss(self, words, word_mask, regions, region_mask, margin=0.2,
                                    aggregation="max_mean", top_k=1):
        """`late_interaction.late_interaction_hinge` over the global batch: each device scores its
        texts against every device's regions and every device's texts against its images, from
        all-gathered sequences (memory O(b x B x words x regions) per device)."""

        def local(words, word_mask, regions, region_mask, margin):
            gather = lambda x: jax.lax.all_gather(x, DATA_AXIS, tiled=True)
            first = jax.lax.axis_index(DATA_AXIS) * words.shape[0]
            scores = late_interaction.pair_scores
            text_rows = scores(words, word_mask, gather(regions), gather(region_mask), aggregation)
            image_rows = scores(gather(words), gather(word_mask), regions, region_mask, aggregation).T
            hinge = late_interaction.hinge_rows
            total = hinge(text_rows, first, margin, top_k) + hinge(image_rows, first, margin, top_k)
            return jax.lax.psum(total, DATA_AXIS) / (2 * words.shape[0] * jax.lax.psum(1, DATA_AXIS))

        data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()
        return shard_map(local, self.mesh, (data,) * 4 + (whole,), whole)(
            words, word_mask, regions, region_mask, jnp.asarray(margin, words.dtype)
        )

    def _gathered_matrices(self, block_sum, matrices, arrays, values, normaliser):
        """sum over `matrices` of weight x `block_sum`(local rows, gathered columns) / `normaliser`(B).

        `arrays` are per-example ({name: [B, ...] or None}), `values` replicated scalars;
        each matrix is (weight, row name, column name, options), read by `block_sum(rows, columns,
        first_row, values, options)` as `rows[name]` (local) and `columns[name]` (all devices')."""
        names = [name for name, array in arrays.items() if array is not None]

        def local(*flat):
            mine = dict(zip(names, flat[: len(names)]))
            everyone = {name: jax.lax.all_gather(array, DATA_AXIS, tiled=True) for name, array in mine.items()}
            rows = next(iter(mine.values())).shape[0]
            first = jax.lax.axis_index(DATA_AXIS) * rows
            total = 0.0
            for weight, row_group, column_group, options in matrices:
                local_rows = {key: mine.get(name) for key, name in row_group.items()}
                columns = {key: everyone.get(name) for key, name in column_group.items()}
                total += weight * block_sum(local_rows, columns, first, flat[len(names):], options)
            global_rows = rows * jax.lax.psum(1, DATA_AXIS)
            return jax.lax.psum(total, DATA_AXIS) / normaliser(global_rows)

        data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()
        in_specs = (data,) * len(names) + (whole,) * len(values)
        return shard_map(local, self.mesh, in_specs, whole)(*[arrays[name] for name in names], *values)

    def similarity_distillation_loss(
        self, image_embeddings, text_embeddings, teacher_image_embeddings, teacher_text_embeddings,
        temperature, image_text=1.0, image_image=1.0, text_text=1.0,
    ):
        """`losses.similarity_distillation_loss` over the global batch: each device's rows against
        every device's columns (student and teacher embeddings all-gathered; memory O(b x B))."""
        arrays = {"image": image_embeddings, "text": text_embeddings,
                  "teacher_image": teacher_image_embeddings, "teacher_text": teacher_text_embeddings}

        def group(rows, columns):
            return ({"student": rows, "teacher": f"teacher_{rows}"},
                    {"student": columns, "teacher": f"teacher_{columns}"})

        matrices = [(weight / 2, *group("image", "text"), False) for weight in (image_text,) if weight]
        matrices += [(weight / 2, *group("text", "image"), False) for weight in (image_text,) if weight]
        matrices += [(weight, *group(name, name), True)
                     for weight, name in ((image_image, "image"), (text_text, "text")) if weight]

        def block(rows, columns, first, values, exclude_self):
            return structure_losses.similarity_kl_rows(rows["student"], columns["student"], rows["teacher"],
                                                       columns["teacher"], values[0], first, exclude_self)

        return self._gathered_matrices(block, matrices, arrays, (jnp.asarray(temperature, jnp.float32),),
                                       lambda rows: rows)

    def hash_similarity_loss(
        self, image_codes, text_codes, target_images, target_texts, peer_image_codes=None,
        peer_text_codes=None, refinement=0.0, image_text=1.0, image_image=1.0, text_text=1.0,
    ):
        """`losses.hash_similarity_loss` over the global batch: each device's rows of codes against
        every device's codes and targets (all-gathered; memory O(b x B))."""
        arrays = {"image": image_codes, "text": text_codes, "target_image": target_images,
                  "target_text": target_texts, "peer_image": peer_image_codes, "peer_text": peer_text_codes}

        def group(name):
            return {"codes": name, "target": f"target_{name}", "peer": f"peer_{name}"}

        matrices = [(weight, group(rows), group(columns), None) for weight, rows, columns in (
            (image_text, "image", "text"), (image_image, "image", "image"), (text_text, "text", "text")) if weight]

        def block(rows, columns, first, values, options):
            return structure_losses.hash_similarity_rows(rows["codes"], columns["codes"], rows["target"],
                                                         columns["target"], rows["peer"], columns["peer"], values[0])

        return self._gathered_matrices(block, matrices, arrays, (jnp.asarray(refinement, jnp.float32),),
                                       lambda rows: rows * rows)

    def _label_likelihood(self, matrices, image_embeddings, text_embeddings, labels, scale, normaliser):
        """Sum over `matrices` ((weight, rows, columns, exclude_self) of "image" / "text") of the
        pairwise NLL of each device's rows against every device's columns and labels (all-gathered;
        memory O(b x B)), over `normaliser`(B)."""
        arrays = {"image": image_embeddings, "text": text_embeddings, "labels": labels}
        groups = [(weight, {"x": rows, "labels": "labels"}, {"x": columns, "labels": "labels"}, exclude_self)
                  for weight, rows, columns, exclude_self in matrices]

        def block(rows, columns, first, values, exclude_self):
            return label_losses.pairwise_likelihood_rows(rows["x"], columns["x"], rows["labels"], columns["labels"],
                                                         values[0], first, exclude_self)

        return self._gathered_matrices(block, groups, arrays, (jnp.asarray(scale, jnp.float32),), normaliser)

    def label_intra_modal_loss(self, image_embeddings, text_embeddings, labels, scale):
        """`losses.label_intra_modal_loss` over the global batch (labels gathered with the rows)."""
        matrices = [(1.0, "image", "image", True), (1.0, "text", "text", True)]
        return self._label_likelihood(matrices, image_embeddings, text_embeddings, labels, scale,
                                      lambda rows: jnp.maximum(rows * (rows - 1), 1))

    def label_inter_modal_loss(self, image_embeddings, text_embeddings, labels, scale, modality_invariance=1.0):
        """`losses.label_inter_modal_loss` over the global batch: the image x text NLL from gathered
        columns; the modality gap pairs rows on the same device, a plain mean that jit reduces."""
        cross = self._label_likelihood([(1.0, "image", "text", False)], image_embeddings, text_embeddings, labels,
                                       scale, lambda rows: rows * rows)
        return cross + modality_invariance * label_losses.modality_gap(image_embeddings, text_embeddings)
