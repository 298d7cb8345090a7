"""Cross-device tower losses: the global batch's negatives on every device, exact gradients.

Rings of `ppermute`s for softmax and sigmoid (one b x b block live per device, hand-written VJPs),
all-gathered columns for the hard-negative terms. The math of each block is in `losses.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlretrieval import losses
from vlretrieval.parallel.mesh import DATA_AXIS


def _shard_map(fn, mesh: Mesh, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _varying(tree):
    """Marks initial loop values as differing per device (they will after one ring step)."""

    def cast(x):
        if DATA_AXIS in jax.typeof(x).manual_axis_type.varying:
            return x
        return jax.lax.pcast(x, (DATA_AXIS,), to="varying")

    return jax.tree.map(cast, tree)


class _Ring:
    """Blocks travelling round the `data` axis: device i hands what it holds to device i + 1."""

    def __init__(self, mesh: Mesh):
        self.size = mesh.shape[DATA_AXIS]
        self.pairs = [(source, (source + 1) % self.size) for source in range(self.size)]

    def shift(self, tree):
        return jax.tree.map(lambda x: jax.lax.ppermute(x, DATA_AXIS, self.pairs), tree)

    def walk(self, home_block, visit, state, travelling=None):
        """Runs `visit(held, travelling, state, home)` on each device's block in turn (`home`, a
        traced bool, is true at step 0 when a device holds its own block).

        At ring step s device i holds the block of device i - s, with `travelling` (e.g. the
        block's gradient accumulator, which `visit` returns updated) alongside it. Both move on
        after each visit, so after the last step `travelling` is back on its block's own device.
        A `fori_loop` rather than an unrolled loop, so one block is live at a time.
        Returns (state, travelling).
        """
        if self.size == 1:
            return visit(home_block, travelling, state, True)[::-1]

        def step(index, carry):
            held, travelling, state = carry
            travelling, state = visit(held, travelling, state, index == 0)
            held, travelling = self.shift((held, travelling))  # held's last move is idle
            return held, travelling, state

        # The home block is step 0 of the loop (not peeled off before it): a loop that XLA cannot
        # unroll keeps one block live even at 2 devices.
        _, travelling, state = jax.lax.fori_loop(
            0, self.size, step, _varying((home_block, travelling, state))
        )
        return state, travelling


def _ring_softmax_direction(mesh: Mesh):
    """Sum over the global batch of one InfoNCE direction, divided by the batch, plus accuracy.

    `f(queries, key_sets, logit_scale, positive_margin) -> (mean cross-entropy, top-1 accuracy)`;
    `key_sets` is a tuple of (keys, valid) arrays sharded like the queries (set 0 holds the
    positives, lowered by the additive margin). Each device
    scores its b rows against every device's keys one b-block at a time as the blocks travel round
    the ring: a running logsumexp forward; backward, the blocks go round again with their gradient
    accumulators, which arrive home holding every device's contribution. Memory O(b x b).
    """
    ring = _Ring(mesh)
    data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()

    def forward_local(queries, key_sets, logit_scale, positive_margin):
        rows = queries.shape[0]
        empty = jnp.full(rows, -jnp.inf, queries.dtype)

        def visit(held, travelling, state, home):
            logsumexp, best = state
            block_sum, block_best = losses.softmax_block_forward(
                queries, held, logit_scale, home, positive_margin
            )
            return travelling, (jnp.logaddexp(logsumexp, block_sum), jnp.maximum(best, block_best))

        (logsumexp, best), _ = ring.walk(key_sets, visit, (empty, empty))
        positive = logit_scale * jnp.sum(queries * key_sets[0][0], axis=1)
        total_rows = rows * ring.size
        margin_sum = jnp.sum(logsumexp - positive + logit_scale * positive_margin)
        loss = jax.lax.psum(margin_sum, DATA_AXIS) / total_rows
        accuracy = jax.lax.psum(jnp.sum(positive > best), DATA_AXIS) / total_rows
        return (loss, accuracy), logsumexp

    def backward_local(queries, key_sets, logit_scale, positive_margin, logsumexp, loss_grad):
        positives = key_sets[0][0]
        coefficient = loss_grad / (queries.shape[0] * ring.size)

        def visit(held, held_grads, state, home):
            query_grad, scale_grad = state
            block = losses.softmax_block_backward(
                queries, held, logit_scale, logsumexp, coefficient, home, positive_margin
            )
            held_grads = jax.tree.map(jnp.add, held_grads, block[1])
            return held_grads, (query_grad + block[0], scale_grad + block[2])

        zeros = jax.tree.map(jnp.zeros_like, key_sets)
        (query_grad, scale_grad), held_grads = ring.walk(
            key_sets, visit, (jnp.zeros_like(queries), jnp.zeros((), queries.dtype)), zeros
        )
        # The positive logit's -scale * (q.k - margin) term.
        query_grad -= coefficient * logit_scale * positives
        (positive_grad, valid_grad), *others = held_grads
        positive_grad -= coefficient * logit_scale * queries
        scale_grad -= coefficient * (jnp.sum(queries * positives) - queries.shape[0] * positive_margin)
        key_grads = ((positive_grad, valid_grad), *others)
        # The margin is a hyperparameter: no gradient.
        return (query_grad, key_grads, jax.lax.psum(scale_grad, DATA_AXIS),
                jnp.zeros_like(positive_margin))

    forward = _shard_map(forward_local, mesh, (data, data, whole, whole), ((whole, whole), data))
    backward = _shard_map(
        backward_local, mesh, (data, data, whole, whole, data, whole), (data, data, whole, whole)
    )

    @jax.custom_vjp
    def direction(queries, key_sets, logit_scale, positive_margin):
        return forward(queries, key_sets, logit_scale, positive_margin)[0]

    def direction_forward(queries, key_sets, logit_scale, positive_margin):
        outputs, logsumexp = forward(queries, key_sets, logit_scale, positive_margin)
        return outputs, (queries, key_sets, logit_scale, positive_margin, logsumexp)

    def direction_backward(residuals, output_grads):
        return backward(*residuals, output_grads[0])  # accuracy has no gradient

    direction.defvjp(direction_forward, direction_backward)
    return direction


def _ring_sigmoid(mesh: Mesh):
    """SigLIP over the global batch: texts travel round the ring, O(b x b) memory per device.

    Backward, the texts go round again with their gradient accumulators (a custom VJP: autodiff of
    the forward ring would keep every received block for the backward pass).
    """
    ring = _Ring(mesh)
    data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()

    def forward_local(images, texts, logit_scale, logit_bias):
        def visit(held, travelling, total, home):
            block = losses.sigmoid_block_loss(images, held, logit_scale, logit_bias, home)
            return travelling, total + block

        total, _ = ring.walk(texts, visit, jnp.zeros((), images.dtype))
        return jax.lax.psum(total, DATA_AXIS) / (images.shape[0] * ring.size)

    def backward_local(images, texts, logit_scale, logit_bias, loss_grad):
        coefficient = loss_grad / (images.shape[0] * ring.size)

        def visit(held, text_grad, state, home):
            image_grad, scale_grad, bias_grad = state
            block = losses.sigmoid_block_backward(
                images, held, logit_scale, logit_bias, coefficient, home
            )
            return text_grad + block[1], (
                image_grad + block[0], scale_grad + block[2], bias_grad + block[3]
            )

        zero = jnp.zeros((), images.dtype)
        (image_grad, scale_grad, bias_grad), text_grad = ring.walk(
            texts, visit, (jnp.zeros_like(images), zero, zero), jnp.zeros_like(texts)
        )
        return (image_grad, text_grad, jax.lax.psum(scale_grad, DATA_AXIS),
                jax.lax.psum(bias_grad, DATA_AXIS))

    forward = _shard_map(forward_local, mesh, (data, data, whole, whole), whole)
    backward = _shard_map(
        backward_local, mesh, (data, data, whole, whole, whole), (data, data, whole, whole)
    )

    @jax.custom_vjp
    def sigmoid(images, texts, logit_scale, logit_bias):
        return forward(images, texts, logit_scale, logit_bias)

    def sigmoid_forward(*arguments):
        return forward(*arguments), arguments

    def sigmoid_backward(arguments, loss_grad):
        return backward(*arguments, loss_grad)

    sigmoid.defvjp(sigmoid_forward, sigmoid_backward)
    return sigmoid


def _valid(keys: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    return jnp.ones(keys.shape[0], keys.dtype) if valid is None else valid.astype(keys.dtype)


class CrossDeviceLosses:
    """The tower losses of `losses.py`, same names and signatures, over a batch sharded on `data`.

    Negatives are the whole global batch: softmax and sigmoid walk the ring (memory O(b x b) per
    device); the hard-negative terms gather every device's embeddings (and composed negatives) as
    columns and score the local rows against them (memory O(b x B)); `all_gather`'s gradient is a
    reduce-scatter, so each device's embeddings get the gradient of every device's rows.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._softmax_direction = _ring_softmax_direction(mesh)
        self.sigmoid_loss = _ring_sigmoid(mesh)

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
        return _shard_map(local, self.mesh, in_specs, whole)(*embeddings, *hyperparameters)

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
