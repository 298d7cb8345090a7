"""orbax checkpoints of the train state, the input pipeline's state and the experiment config,
in `<workdir>/checkpoints`.

The pipeline state (`pipeline.TrainingBatches.get_state()`) is saved with every step so a resumed
run reads exactly the batches it had not read. Every host's pipeline is at the same position (one
batch per step each), so the primary host's state stands for all of them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from vlretrieval.errors import UserError


class Checkpointer:
    """Saves asynchronously every N steps, keeps the last `max_to_keep`, restores the latest."""

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, config: ml_collections.ConfigDict, data_state: Any = None
    ) -> None:
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config.to_dict()),
        }
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore_data_state(self, step: int) -> Any:
        """The input pipeline's state saved at `step`, or None (a checkpoint without one)."""
        if "data_state" not in self.manager.item_metadata(step):
            return None
        restored = self.manager.restore(
            step, args=ocp.args.Composite(data_state=ocp.args.JsonRestore())
        )
        return restored.data_state

    def restore(self, state_template: Any, step: int | None = None) -> Any:
        """The saved state at `step` (default: the latest), shaped and sharded like the template."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {self.directory}; train first or pass --workdir")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_template))
            )
        except (ValueError, KeyError) as error:
            raise UserError(
                f"checkpoint {self.directory}/{step} does not match this model's parameters "
                f"(a different config?): {str(error).splitlines()[0]}"
            ) from None
        return restored.state

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (looked up without creating anything)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(entry.isdigit() for entry in os.listdir(directory))


def _checkpoint_location(path: str) -> tuple[str, int]:
    """(checkpoints directory, step) for a workdir, its checkpoints/ folder, or checkpoints/<step>."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(name)
    for directory in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(directory):
            steps = [int(entry) for entry in os.listdir(directory) if entry.isdigit()]
            if steps:
                return directory, max(steps)
    raise UserError(f"--init_from {path}: no checkpoint there (expected a workdir or checkpoints/<step>)")


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def load_params(path: str, params_template: Any) -> Any:
    """Parameters of another run's checkpoint, checked leaf by leaf against this model's.

    The first parameter that is missing, extra or of another shape is named with both shapes:
    a checkpoint of another architecture must fail loudly, not load half-way.
    """
    directory, step = _checkpoint_location(path)
    manager = ocp.CheckpointManager(directory)
    try:
        saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as error:  # orbax raises many types for an unreadable checkpoint
        raise UserError(f"--init_from {path}: cannot read checkpoint {step}: {str(error).splitlines()[0]}") from None
    finally:
        manager.close()
    state = saved.state
    saved_params = state["params"] if isinstance(state, dict) else state.params
    saved_leaves = dict(
        (_path_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(saved_params)
    )
    template_leaves = jax.tree_util.tree_leaves_with_path(params_template)
    for leaf_path, leaf in template_leaves:
        name = _path_name(leaf_path)
        if name not in saved_leaves:
            raise UserError(f"--init_from {path}: parameter {name} of this model is not in the checkpoint")
        if tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise UserError(
                f"--init_from {path}: parameter {name} has shape {tuple(saved_leaves[name].shape)} "
                f"in the checkpoint but {tuple(leaf.shape)} in this model"
            )
    extra = sorted(set(saved_leaves) - {_path_name(p) for p, _ in template_leaves})
    if extra:
        raise UserError(f"--init_from {path}: checkpoint parameter {extra[0]} is not in this model")
    treedef = jax.tree_util.tree_structure(params_template)
    return jax.tree_util.tree_unflatten(
        treedef,
        [jnp.asarray(saved_leaves[_path_name(p)], leaf.dtype) for p, leaf in template_leaves],
    )
