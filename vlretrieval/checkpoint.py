"""orbax checkpoints in `<workdir>/checkpoints`: train state (parameters, optimizer state, step,
RNG), every host's input pipeline state, the experiment config, and eval metrics when there are.

Saves are asynchronous (training goes on while the previous step's arrays are written) and
atomic: orbax writes into a temporary folder and renames it when complete, so a process killed
mid-save leaves no checkpoint that looks complete (its temporary folder is removed at the next
start). Kept: the last `keep_last` and the `keep_best` best by an eval metric. Resuming takes the
latest complete checkpoint; one that cannot be read (a truncated file) is set aside as
`<step>.unreadable-<time>` with a warning, and the one before it is used.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

from vlretrieval.errors import UserError, first_line
from vlretrieval.models import layout
from vlretrieval.parallel import hosts

log = logging.getLogger(__name__)


class Checkpointer:
    """One run's checkpoints: asynchronous saves, last-K + best-K retention, resumable restore."""

    def __init__(self, workdir: str, keep_last: int = 3, keep_best: int = 0,
                 best_metric: str = "mean_recall", read_only: bool = False):
        """`read_only` (evaluation): nothing in the folder is created, cleaned up, renamed or
        deleted, whatever is found there."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.read_only = read_only
        if read_only and not os.path.isdir(self.directory):
            raise self._none_found()
        policies = [checkpoint_managers.LatestN(keep_last)]
        if keep_best:
            # Higher is better (a recall): BestN keeps the end of the ascending order.
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], n=keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Every item's handler named up front, so restoring some items of a checkpoint that
            # holds others (the state without the config) needs no warning from orbax.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data_state": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                # Read-only without orbax's read_only option, which warns twice at every start.
                create=not read_only,
                cleanup_tmp_directories=not read_only,  # what a save killed half-way left behind
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            ),
        )

    def _none_found(self) -> UserError:
        return UserError(f"no checkpoint in {self.directory}; train first or pass --workdir")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        config: ml_collections.ConfigDict,
        data_state: Any = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts an asynchronous save. `data_state` is this host's pipeline state: every host's
        is gathered, so a resumed run restores each host's own. Every process must call it."""
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config.to_dict()),
        }
        if data_state is not None:
            states = hosts.gather_json(data_state)
            items["data_state"] = ocp.args.JsonSave(
                {f"process_{index}": value for index, value in enumerate(states)}
            )
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore_data_state(self, step: int) -> Any:
        """This host's input pipeline state saved at `step`, or None (a checkpoint without one).

        A run resumed on another number of hosts takes process 0's: every host's pipeline is at
        the same global step, which is all its position depends on (`pipeline.training_dataset`).
        """
        restored = self._restore_json(step, "data_state")
        if restored is None:
            return None
        return restored.get(f"process_{jax.process_index()}", restored["process_0"])

    def saved_config(self, step: int) -> dict | None:
        """The experiment config saved with the checkpoint at `step` (a dict), or None."""
        return self._restore_json(step, "config")

    def _restore_json(self, step: int, item: str) -> Any:
        """One JSON item of the checkpoint at `step`, or None if it was saved without it."""
        try:
            if item not in self.manager.item_metadata(step):
                return None
            return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as error:  # a damaged metadata or JSON file: one line, not a traceback
            raise UserError(
                f"checkpoint {self.directory}/{step} cannot be read ({item}): {_storage_error(error)}"
            ) from None

    def restore_latest(
        self, state_template: Any, *, step: int | None = None, fallback: bool = True
    ) -> tuple[int, Any]:
        """(step, state) of the checkpoint at `step`, or else of the latest one.

        A latest checkpoint that cannot be read: with `fallback` the newest readable one is used,
        with one warning line (a training run also sets the unreadable ones aside, so it can save
        those steps again; a read-only one leaves them); without, one error naming the step.
        """
        steps = self.all_steps()
        if not steps:
            raise self._none_found()
        if step is not None:
            if step not in steps:
                raise UserError(f"no checkpoint at step {step} in {self.directory}; it has steps {steps}")
            return step, self._restore_step(state_template, step)
        first_error = None
        for position, candidate in enumerate(reversed(steps)):
            try:
                state = self._restore_step(state_template, candidate)
            except UserError as error:
                if not fallback:
                    older = f"; pass --step {steps[-2]} or --fallback to use an older one" if len(steps) > 1 else ""
                    raise UserError(f"{error}{older}") from None
                first_error = first_error or error
                continue
            for unreadable in steps[len(steps) - position:]:
                self._skip(unreadable, first_error, candidate)
            return candidate, state
        raise first_error

    def _restore_step(self, state_template: Any, step: int) -> Any:
        """The state at `step` shaped like the template; a checkpoint written with the other
        encoder-stack layout (`model.scan_layers`) is restored in its own layout and converted."""
        saved_scanned = self._saved_layout(step)
        wanted_scanned = layout.is_scanned(state_template)
        if saved_scanned is None or wanted_scanned is None or saved_scanned == wanted_scanned:
            return self._restore_as(state_template, step)
        restored = self._restore_as(layout.to_layout(state_template, saved_scanned), step)
        return layout.to_layout(restored, wanted_scanned)

    def _saved_layout(self, step: int) -> bool | None:
        try:
            tree = self.manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)
            return layout.is_scanned(tree["params"])
        except Exception:  # no metadata to go by: the restore itself reports what is wrong
            return None

    def _restore_as(self, state_template: Any, step: int) -> Any:
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_template))
            )
        except (ValueError, KeyError) as error:
            raise UserError(
                f"checkpoint {self.directory}/{step} does not match this model's parameters "
                f"(a different config?) or is damaged: {first_line(error)}"
            ) from None
        except Exception as error:  # orbax / tensorstore raise many types for damaged files
            raise UserError(
                f"checkpoint {self.directory}/{step} cannot be read: {_storage_error(error)}"
            ) from None
        return restored.state

    def _skip(self, step: int, error: Exception, used: int) -> None:
        """One warning line for a checkpoint that cannot be read. A training run renames it out of
        orbax's sight (kept for inspection), so the resumed run can save that step again."""
        source = os.path.join(self.directory, str(step))
        if self.read_only:
            log.warning(f"{error}; using step {used} (--fallback)")
            return
        target = f"{source}.unreadable-{int(time.time())}"
        if jax.process_index() == 0:
            os.rename(source, target)
            log.warning(f"skipping checkpoint {source}, which cannot be read ({error}); moved to {target}")
        hosts.barrier("set_aside_checkpoint")
        self.manager.reload()

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (looked up without creating anything)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(entry.isdigit() for entry in os.listdir(directory))


def find_checkpoint(path: str) -> tuple[str, int]:
    """(checkpoints directory, step) of a run folder (its latest step), its checkpoints/ folder,
    or one checkpoints/<step>."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(name)
    for directory in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(directory):
            steps = [int(entry) for entry in os.listdir(directory) if entry.isdigit()]
            if steps:
                return directory, max(steps)
    raise UserError(f"{path}: no vlretrieval checkpoint there (expected a run folder, its "
                    "checkpoints/ or checkpoints/<step>)")


def read_saved_params(path: str, *, with_config: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """(parameters as saved, the saved config dict when `with_config`) of the newest checkpoint at
    `path` (a run folder, its checkpoints/ or checkpoints/<step>), without a model to restore into.
    A checkpoint that cannot be read is one `UserError` line."""
    directory, step = find_checkpoint(path)
    items = {"state": ocp.args.StandardRestore()}
    if with_config:
        items["config"] = ocp.args.JsonRestore()
    manager = ocp.CheckpointManager(directory)
    try:
        saved = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax raises many types for an unreadable checkpoint
        raise UserError(f"{path}: cannot read checkpoint {step}: {first_line(error)}") from None
    finally:
        manager.close()
    state = saved.state
    params = state["params"] if isinstance(state, dict) else state.params
    return params, (saved.config if with_config else None)


def load_params(path: str, params_template: Any) -> Any:
    """Parameters of another run's checkpoint, checked leaf by leaf against this model's.

    The first parameter that is missing, extra or of another shape is named with both shapes:
    a checkpoint of another architecture must fail loudly, not load half-way.
    """
    try:
        saved_params, _ = read_saved_params(path)
    except UserError as error:
        raise UserError(f"--init_from {error}") from None
    distilled = isinstance(saved_params, dict) and {"student", "teacher"} <= set(saved_params)
    if distilled and "student" not in params_template:
        saved_params = saved_params["student"]  # a run distilled from a teacher: its student's parameters
    # A run trained with the other stack layout (scan_layers) loads all the same.
    saved_params = layout.to_layout(saved_params, scanned=bool(layout.is_scanned(params_template)))
    saved_leaves = traverse_util.flatten_dict(saved_params, sep="/")
    template_leaves = traverse_util.flatten_dict(params_template, sep="/")
    for name, leaf in template_leaves.items():
        if name not in saved_leaves:
            raise UserError(f"--init_from {path}: parameter {name} of this model is not in the checkpoint")
        if tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise UserError(
                f"--init_from {path}: parameter {name} has shape {tuple(saved_leaves[name].shape)} "
                f"in the checkpoint but {tuple(leaf.shape)} in this model"
            )
    extra = sorted(set(saved_leaves) - set(template_leaves))
    if extra:
        raise UserError(f"--init_from {path}: checkpoint parameter {extra[0]} is not in this model")
    return traverse_util.unflatten_dict(
        {name: jnp.asarray(saved_leaves[name], leaf.dtype) for name, leaf in template_leaves.items()}, sep="/"
    )


def _storage_error(error: Exception) -> str:
    """The first line of an orbax / TensorStore error, without TensorStore's repr of its spec."""
    return first_line(error).split(" See full TensorStore details")[0]
