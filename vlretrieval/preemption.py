"""Pre-emption: a SIGTERM (what SLURM, Kubernetes and Cloud TPU send before taking a machine)
makes the trainer save at the step it is on and stop; every host stops at the same step.

Also the fault-injection point the resume tests use to kill a run in the middle of an
asynchronous save, which no outside timing could hit reliably.
"""

from __future__ import annotations

import os
import signal

# Exit status of a pre-empted run: 128 + SIGTERM, the shell's status for "terminated", so job
# scripts can tell "resumable, not finished" from success (0) and failure.
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM
# Tests only: SIGKILL this process right after the asynchronous save of this step has started.
KILL_DURING_SAVE_ENV = "VLRETRIEVAL_TEST_KILL_DURING_SAVE_AT_STEP"


class Preempted(Exception):
    """Training stopped early on SIGTERM, after saving a checkpoint at `step`."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"pre-empted (SIGTERM) at step {step}: checkpoint saved in {directory}; run the same "
            "command again to resume"
        )
        self.step = step


class SigtermGuard:
    """Within `with`, SIGTERM only sets a flag that the training loop polls between steps."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self) -> SigtermGuard:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self) -> bool:
        """Whether any host has received SIGTERM (a collective on several hosts: call it at the
        same point of every step on every host, so all stop at the same step)."""
        from vlretrieval.parallel import hosts  # lazily: the CLI imports this module for --help

        return hosts.any_process(self.received)


def fault_point_after_save_started(step: int) -> None:
    """Kills the process outright if the tests asked for it at this step (no cleanup runs: the
    save in flight is left half-written, as a machine that vanished would leave it)."""
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
