"""Encoder-stack layouts: `block_0 ... block_{n-1}` (unrolled) or `blocks` (one `nn.scan`, every
leaf with a leading layer axis).

The same weights in either layout compute the same function, so a checkpoint or converted model
written in one loads into a model built with the other. The converters speak the unrolled layout
(one Hugging Face layer = one `block_i`); `to_layout` moves any pytree that holds parameter-shaped
dicts (parameters, optimizer moments, a whole train state, shapes only) between the two.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SCANNED = "blocks"
_UNROLLED = re.compile(r"block_(\d+)")


def _is_stack(node: Any) -> bool:
    return isinstance(node, dict) and (SCANNED in node or "block_0" in node)


def _stack(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if isinstance(first, np.ndarray | np.generic):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack(leaf, index: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[index]


def _depth(blocks: Any) -> int:
    return jax.tree_util.tree_leaves(blocks)[0].shape[0]


def _relayout(encoder: dict, scanned: bool) -> dict:
    unrolled = sorted((int(m.group(1)), key) for key in encoder if (m := _UNROLLED.fullmatch(key)))
    rest = {key: value for key, value in encoder.items()
            if key != SCANNED and not _UNROLLED.fullmatch(key)}
    if scanned and unrolled:
        rest[SCANNED] = jax.tree_util.tree_map(_stack, *[encoder[key] for _, key in unrolled])
        return rest
    if not scanned and SCANNED in encoder:
        blocks = encoder[SCANNED]
        for index in range(_depth(blocks)):
            rest[f"block_{index}"] = jax.tree_util.tree_map(lambda x, i=index: _unstack(x, i), blocks)
        return rest
    return encoder


def to_layout(tree: Any, scanned: bool) -> Any:
    """`tree` with every encoder stack in the scanned (`blocks`) or unrolled (`block_i`) layout."""
    return jax.tree_util.tree_map(
        lambda node: _relayout(node, scanned) if _is_stack(node) else node, tree, is_leaf=_is_stack
    )


def is_scanned(tree: Any) -> bool | None:
    """True / False for a tree whose stacks are all scanned / all unrolled; None if it has none."""
    found = set()

    def visit(node):
        if _is_stack(node):
            found.add(SCANNED in node)
        return node

    jax.tree_util.tree_map(visit, tree, is_leaf=_is_stack)
    if len(found) > 1:
        raise ValueError("the tree mixes scanned and unrolled encoder stacks")
    return found.pop() if found else None


def flat_to_layout(flat: dict[str, Any], scanned: bool) -> dict[str, Any]:
    """The same for a flat {"a/b/c": array} mapping (what the converters use)."""
    nested = traverse_util.unflatten_dict(flat, sep="/")
    return traverse_util.flatten_dict(to_layout(nested, scanned), sep="/")
