"""Ring losses: the global batch's negatives with one b x b block live per device.

Each device holds b rows. Blocks of keys travel round the `data` axis (`ppermute`), and each device
scores its rows against one block at a time. Autodiff of such a loop would keep every received
block for the backward pass (O(b x B)), so each ring has a custom VJP whose backward walks the ring
again, carrying every block's gradient accumulator with it. The softmax block's gradient is
`jax.vjp` of its forward math; the sigmoid block's is written by hand because that measured
smaller (`benchmarks/loss_memory.py`, docs/multi-device.md).

Key sets are tuples of (keys [b, d], valid [b] float 0/1); set 0 holds the positives (the home
block's diagonal). `ABSENT_NEGATIVE` logits weigh nothing (a composed negative that does not exist).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlretrieval.losses import ABSENT_NEGATIVE
from vlretrieval.parallel.mesh import DATA_AXIS


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _varying(tree):
    """Marks values as differing per device (initial loop values will after one ring step).

    Outside shard_map (a block's math called on whole arrays) there is nothing to mark.
    """
    if DATA_AXIS not in jax.sharding.get_abstract_mesh().manual_axes:
        return tree

    def cast(x):
        if DATA_AXIS in jax.typeof(x).manual_axis_type.varying:
            return x
        return jax.lax.pcast(x, (DATA_AXIS,), to="varying")

    return jax.tree.map(cast, tree)


class Ring:
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


# --- Softmax (InfoNCE): one direction, rows = queries, columns = every device's key sets. ---


def _block_logits(queries, key_sets, logit_scale, home, positive_margin, margin_scale=None):
    """[b, b] logits of the rows against each key set's block, absent keys at ABSENT_NEGATIVE.

    The positives (the home block's diagonal of set 0) are lowered by scale * margin (LaBSE;
    `margin_scale`, default the logit scale). Returns (list of logits, list of bool negative masks).
    """
    margin_scale = logit_scale if margin_scale is None else margin_scale
    all_logits, all_negatives = [], []
    for index, (keys, valid) in enumerate(key_sets):
        present = valid[None, :] > 0
        logits = jnp.where(present, logit_scale * (queries @ keys.T), ABSENT_NEGATIVE)
        negative = present
        if index == 0:
            diagonal = jnp.logical_and(home, jnp.eye(*logits.shape, dtype=bool))
            logits = logits - jnp.where(diagonal, margin_scale * positive_margin, 0.0)
            negative = jnp.logical_and(present, ~diagonal)
        all_logits.append(logits)
        all_negatives.append(negative)
    return all_logits, all_negatives


def softmax_block_forward(queries, key_sets, logit_scale, home, positive_margin=0.0):
    """(logsumexp [b], best negative logit [b]) of the rows over one block of every key set."""
    all_logits, all_negatives = _block_logits(queries, key_sets, logit_scale, home, positive_margin)
    partial_sums = [jax.nn.logsumexp(logits, axis=1) for logits in all_logits]
    best = [jnp.where(negative, logits, -jnp.inf).max(axis=1)
            for logits, negative in zip(all_logits, all_negatives)]
    return jax.nn.logsumexp(jnp.stack(partial_sums), axis=0), jnp.max(jnp.stack(best), axis=0)


def softmax_block_gradients(queries, key_sets, logit_scale, logsumexp, coefficient, home,
                            positive_margin=0.0):
    """Gradients of coefficient * sum(logsumexp) through one block: (d queries, d key sets, d scale).

    d logsumexp_r / d logit_rj is exp(logit_rj - logsumexp_r) with the whole ring's logsumexp, which
    is the gradient of sum(exp(logit - logsumexp)) with logsumexp held fixed: `jax.vjp` of that.
    """

    def block_mass(queries, key_sets, similarity_scale, logit_scale):
        all_logits, _ = _block_logits(queries, key_sets, similarity_scale, home, positive_margin,
                                      margin_scale=logit_scale)
        return sum(jnp.sum(jnp.exp(logits - logsumexp[:, None])) for logits in all_logits)

    return _block_vjp(block_mass, queries, key_sets, logit_scale, coefficient)


def _block_vjp(block_function, rows, columns, logit_scale, coefficient):
    """`jax.vjp` of one block's value, cotangent `coefficient`: (d rows, d columns, d scale).

    `block_function(rows, columns, similarity_scale, logit_scale)` uses `similarity_scale`
    only as scale * (rows . columns) and `logit_scale` for anything else (LaBSE's scaled margin).
    The similarity scale is held fixed, and its share of d scale read off the rows: the rows enter
    only through scale * rows, so that share is rows . d rows / scale. Autodiff through
    scale * similarity would keep a [b, b] similarity block for it (measured with
    `benchmarks/loss_memory.py`, docs/multi-device.md).
    """
    # Replicated inputs enter as per-device values: the VJP of a replicated value inside shard_map
    # is summed over devices, and the ring sums the blocks itself (once, after the walk).
    fixed_scale, logit_scale = logit_scale, _varying(logit_scale)
    output, vjp = jax.vjp(
        lambda rows, columns, logit_scale: block_function(rows, columns, fixed_scale, logit_scale),
        rows, columns, logit_scale,
    )
    row_grad, column_grad, scale_grad = vjp(
        _varying(jnp.asarray(coefficient, output.dtype))  # the block's value differs per device
    )
    scale_grad = scale_grad + jnp.sum(rows * row_grad) / fixed_scale
    return row_grad, column_grad, scale_grad


def ring_softmax_direction(mesh: Mesh):
    """Sum over the global batch of one InfoNCE direction, divided by the batch, plus accuracy.

    `f(queries, key_sets, logit_scale, positive_margin) -> (mean cross-entropy, top-1 accuracy)`;
    `key_sets` is a tuple of (keys, valid) arrays sharded like the queries (set 0 holds the
    positives, lowered by the additive margin). Forward: a running logsumexp as the blocks travel.
    Backward: the blocks go round again with their gradient accumulators, which arrive home holding
    every device's contribution. Memory O(b x b).
    """
    ring = Ring(mesh)
    data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()

    def forward_local(queries, key_sets, logit_scale, positive_margin):
        rows = queries.shape[0]
        empty = jnp.full(rows, -jnp.inf, queries.dtype)

        def visit(held, travelling, state, home):
            logsumexp, best = state
            block_sum, block_best = softmax_block_forward(
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
            block = softmax_block_gradients(
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

    forward = shard_map(forward_local, mesh, (data, data, whole, whole), ((whole, whole), data))
    backward = shard_map(
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


# --- Sigmoid (SigLIP): texts travel, every (image, text) pair one binary decision. ---


def sigmoid_block_loss(images, texts, logit_scale, logit_bias, diagonal_is_positive):
    """Sum of SigLIP's pairwise losses -log sigmoid(z * logit) over a block, z = +1 for the
    diagonal's pairs when `diagonal_is_positive` (a bool, possibly traced: the block pairs each
    image with its own text), -1 elsewhere.

    Every pair is first counted as a negative, -log sigmoid(-l) = softplus(l); a positive pair's
    loss is softplus(l) - l, so the diagonal's logits (a row-wise product, [b]) are subtracted.
    No [b, b] label mask: a ring's loop would hoist it and hold it for the whole walk.
    """
    logits = logit_scale * (images @ texts.T) + logit_bias
    diagonal = logit_scale * jnp.sum(images * texts, axis=1) + logit_bias
    return jnp.sum(jax.nn.softplus(logits)) - jnp.where(diagonal_is_positive, jnp.sum(diagonal), 0.0)


def sigmoid_block_gradients(images, texts, logit_scale, logit_bias, coefficient, diagonal_is_positive):
    """Gradients of coefficient * sigmoid_block_loss: (d images, d texts, d scale, d bias).

    Written by hand, the one block gradient that is: `jax.vjp` of the block (`_block_vjp`) measured
    1.25x to 1.7x this one's memory at 2 to 8 devices, B = 16,384 (docs/multi-device.md).
    d softplus(l) / dl = sigmoid(l); the diagonal's -l adds -1. One [b, b] temporary: the scale's
    gradient sum_ij g_ij (x_i . y_j) = sum_i x_i . (g y)_i is read off the image side's product.
    """
    logits = logit_scale * (images @ texts.T) + logit_bias
    scaled_grad = (coefficient * logit_scale) * jax.nn.sigmoid(logits)  # d loss / d similarity
    positive = jnp.where(diagonal_is_positive, coefficient * logit_scale, 0.0)
    image_grad = scaled_grad @ texts - positive * texts
    scale_grad = jnp.sum(images * image_grad) / logit_scale
    bias_grad = jnp.sum(scaled_grad) / logit_scale - jnp.where(
        diagonal_is_positive, coefficient * images.shape[0], 0.0
    )
    return image_grad, scaled_grad.T @ images - positive * images, scale_grad, bias_grad


def ring_sigmoid(mesh: Mesh):
    """SigLIP over the global batch, divided by the batch: texts travel round the ring."""
    ring = Ring(mesh)
    data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()

    def forward_local(images, texts, logit_scale, logit_bias):
        def visit(held, travelling, total, home):
            block = sigmoid_block_loss(images, held, logit_scale, logit_bias, home)
            return travelling, total + block

        total, _ = ring.walk(texts, visit, jnp.zeros((), images.dtype))
        return jax.lax.psum(total, DATA_AXIS) / (images.shape[0] * ring.size)

    def backward_local(images, texts, logit_scale, logit_bias, loss_grad):
        coefficient = loss_grad / (images.shape[0] * ring.size)

        def visit(held, text_grad, state, home):
            image_grad, scale_grad, bias_grad = state
            block = sigmoid_block_gradients(images, held, logit_scale, logit_bias, coefficient, home)
            return text_grad + block[1], (
                image_grad + block[0], scale_grad + block[2], bias_grad + block[3]
            )

        zero = jnp.zeros((), images.dtype)
        (image_grad, scale_grad, bias_grad), text_grad = ring.walk(
            texts, visit, (jnp.zeros_like(images), zero, zero), jnp.zeros_like(texts)
        )
        return (image_grad, text_grad, jax.lax.psum(scale_grad, DATA_AXIS),
                jax.lax.psum(bias_grad, DATA_AXIS))

    forward = shard_map(forward_local, mesh, (data, data, whole, whole), whole)
    backward = shard_map(
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
