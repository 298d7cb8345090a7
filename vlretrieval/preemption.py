"""Pre-emption and Ctrl-C: a SIGTERM (what SLURM, Kubernetes and Cloud TPU send before taking a
machine) or a first Ctrl-C (SIGINT) makes the trainer save at the step it is on and stop; every
host stops at the same step. A second Ctrl-C stops at once.

Also the fault-injection point the resume tests use to kill a run in the middle of an
asynchronous save, which no outside timing could hit reliably.
"""

from __future__ import annotations

import os
import signal

# Tests only: SIGKILL this process (or send it a Ctrl-C) right after the asynchronous save of
# this step has started.
KILL_DURING_SAVE_ENV = "VLRETRIEVAL_TEST_KILL_DURING_SAVE_AT_STEP"
INTERRUPT_DURING_SAVE_ENV = "VLRETRIEVAL_TEST_INTERRUPT_DURING_SAVE_AT_STEP"
_SIGNAL_NAMES = {signal.SIGTERM: "pre-empted (SIGTERM)", signal.SIGINT: "interrupted (Ctrl-C)"}


class Preempted(Exception):
    """Training stopped early on SIGTERM or Ctrl-C, after saving a checkpoint at `step`."""

    def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM):
        super().__init__(
            f"{_SIGNAL_NAMES[signum]} at step {step}: checkpoint saved in {directory}; run the same "
            "command again to resume"
        )
        self.step = step
        # 128 + the signal (143 for SIGTERM, 130 for Ctrl-C), the shell's status, so job scripts
        # can tell "resumable, not finished" from success and failure.
        self.exit_status = 128 + signum


class StopSignalGuard:
    """Within `with`, SIGTERM and a first Ctrl-C only set a flag that the training loop polls
    between steps; a second Ctrl-C raises KeyboardInterrupt at once (stop without saving)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None  # the first stop signal, if any
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignalGuard:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def requested(self) -> bool:
        """Whether any host has received a stop signal (a collective on several hosts: call it at
        the same point of every step on every host, so all stop at the same step)."""
        from vlretrieval.parallel import hosts  # lazily: the CLI imports this module for --help

        return hosts.any_process(self.received is not None)

    @property
    def signum(self) -> int:
        """The signal to report: this host's, or SIGTERM when only another host received one."""
        return self.received or signal.SIGTERM


def fault_point_after_save_started(step: int) -> None:
    """Kills the process outright if the tests asked for it at this step (no cleanup runs: the
    save in flight is left half-written, as a machine that vanished would leave it), or sends it
    the Ctrl-C a user would press while the save is in flight."""
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(INTERRUPT_DURING_SAVE_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGINT)
