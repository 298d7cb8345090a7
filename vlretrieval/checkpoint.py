"""orbax checkpoints of the train state plus the experiment config, in `<workdir>/checkpoints`.

The data position needs no saving of its own: training batches are a pure function of
(seed, step), so restoring the step restores the data order (see `data/pipeline.py`).
"""

from __future__ import annotations

import os
from typing import Any

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

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())
            ),
        )

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
