"""Multi-host start-up through JAX's own distributed runtime (`jax.distributed.initialize`).

Where the process count and this process's id come from, first match wins:
1. explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`);
2. the environment `launch/local.py` sets (`VLRETRIEVAL_COORDINATOR_ADDRESS`,
   `VLRETRIEVAL_NUM_PROCESSES`, `VLRETRIEVAL_PROCESS_ID`);
3. a SLURM job step with several tasks, a Cloud TPU VM with several workers, or
   `VLRETRIEVAL_DISTRIBUTED=auto` (what `launch/tpu_pod.sh` sets): JAX detects the cluster from
   the environment and the TPU metadata;
4. otherwise a single process, and nothing is initialised.

CPU processes exchange collectives through gloo. A process that dies is noticed by the others
(`PeerWatchdog`, after half the heartbeat timeout), which stop with one line naming it instead of
waiting forever in a collective; JAX's own heartbeat check (`heartbeat_timeout_seconds`) backs it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlretrieval import log as log_lib
from vlretrieval.errors import UserError, first_line

log = logging.getLogger(__name__)

ENVIRONMENT = {
    "coordinator_address": "VLRETRIEVAL_COORDINATOR_ADDRESS",
    "num_processes": "VLRETRIEVAL_NUM_PROCESSES",
    "process_id": "VLRETRIEVAL_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class HostSetup:
    """How this process joins a multi-host run (all None: on its own)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_seconds: int = 60
    initialization_timeout_seconds: int = 300


def _integer(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def host_setup(
    coordinator_address: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    heartbeat_timeout_seconds: int = 60,
    environ: dict[str, str] | None = None,
) -> HostSetup:
    """The explicit values, else the launcher's environment variables, checked together."""
    environ = os.environ if environ is None else environ
    explicit = (coordinator_address, num_processes, process_id)
    if all(value is None for value in explicit):
        coordinator_address = environ.get(ENVIRONMENT["coordinator_address"]) or None
        num_processes = environ.get(ENVIRONMENT["num_processes"]) or None
        process_id = environ.get(ENVIRONMENT["process_id"]) or None
    setup = HostSetup(
        coordinator_address=coordinator_address,
        num_processes=_integer(num_processes, "--num_processes"),
        process_id=_integer(process_id, "--process_id"),
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    given = [value is not None for value in (setup.coordinator_address, setup.num_processes,
                                              setup.process_id)]
    if any(given) and not all(given):
        raise UserError(
            "a multi-host run needs all of --coordinator_address, --num_processes and "
            "--process_id (or none of them, to detect SLURM / Cloud TPU or run alone)"
        )
    if all(given):
        if setup.num_processes < 1 or not 0 <= setup.process_id < setup.num_processes:
            raise UserError(
                f"--process_id {setup.process_id} is not in [0, --num_processes "
                f"{setup.num_processes})"
            )
        host, _, port = setup.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"--coordinator_address {setup.coordinator_address!r} must be HOST:PORT"
            )
    return setup


def _cluster_detected(environ) -> bool:
    """A SLURM step with several tasks, or a Cloud TPU VM that is one of several workers."""
    if environ.get("VLRETRIEVAL_DISTRIBUTED") == "auto":
        return True
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(setup: HostSetup, environ: dict[str, str] | None = None) -> bool:
    """Joins the run `setup` describes (or the detected cluster); returns whether several
    processes take part. Call before anything else touches JAX's devices."""
    environ = os.environ if environ is None else environ
    explicit = setup.num_processes is not None
    if not explicit and not _cluster_detected(environ):
        return False
    if explicit and setup.num_processes == 1:
        return False
    # Collectives between CPU processes need gloo; accelerators use their own (NCCL, ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=setup.coordinator_address,
            num_processes=setup.num_processes,
            process_id=setup.process_id,
            initialization_timeout=setup.initialization_timeout_seconds,
            heartbeat_timeout_seconds=setup.heartbeat_timeout_seconds,
        )
    except Exception as error:  # the runtime raises several types for an unreachable peer
        where = setup.coordinator_address or "the detected cluster"
        raise UserError(
            f"cannot join the multi-host run at {where} "
            f"(process {setup.process_id} of {setup.num_processes}): "
            f"{first_line(error)}"
        ) from None
    log_lib.set_process(jax.process_index(), jax.process_count())  # only process 0 prints info
    return True


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order. A collective: every process
    must call it."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, lengths.ravel())]


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective), so all hosts take the same branch."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).any())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class PeerWatchdog:
    """Stops this process with one clear line when another process of the run is lost.

    Every `interval` seconds each process bumps its own counter in the coordination service's
    key-value store and reads the others'. A peer whose counter has not moved for `timeout`
    seconds has died or become unreachable; if the store itself is gone, process 0 (which serves
    it) has. Either way this process prints which peer was lost and exits with status 1, rather
    than waiting in a collective that will never complete. (JAX's own heartbeat check, at a
    longer timeout, stays as a backstop; it aborts with a stack trace.) A process that finished
    its work says so first (`finish`), so a peer still busy is not taken for lost.
    """

    def __init__(self, timeout: float, interval: float = 1.0):
        from jax._src import distributed  # the runtime's client: no public accessor

        self.client = distributed.global_state.client
        self.coordinator = distributed.global_state.coordinator_address
        self.timeout, self.interval = timeout, interval
        self.me, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

    def start(self) -> PeerWatchdog:
        self.thread.start()
        return self

    def _lost(self, message: str) -> None:
        if self.stopped.is_set():
            return
        log.error(f"{message}; stopping process {self.me} of {self.count}")
        os._exit(1)  # a thread cannot raise into the main thread, which may be inside XLA

    def _run(self) -> None:
        seen: dict[int, tuple[str | None, float]] = {}
        while not self.stopped.wait(self.interval):
            try:
                self.client.key_value_increment(f"vlretrieval/heartbeat/{self.me}", 1)
                now = time.monotonic()
                for peer in range(self.count):
                    if peer == self.me or self._finished(peer):
                        continue
                    value = self._try_get(f"vlretrieval/heartbeat/{peer}")
                    if peer not in seen or seen[peer][0] != value:
                        seen[peer] = (value, now)
                    elif now - seen[peer][1] > self.timeout:
                        self._lost(f"lost process {peer}: no heartbeat for {self.timeout:.0f} s "
                                   "(it died or its host became unreachable)")
            except Exception as error:  # the store is served by process 0: it is gone
                self._lost(f"lost process 0 (the coordinator at {self.coordinator}): "
                           f"{first_line(error, repr(error))}")

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as error:  # NOT_FOUND: the peer has not beaten yet
            if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
                return None
            raise

    def _finished(self, peer: int) -> bool:
        return self._try_get(f"vlretrieval/finished/{peer}") is not None

    def finish(self) -> None:
        """This process's work is done: peers stop watching it, and it stops watching them."""
        self.stopped.set()
        self.client.key_value_set(f"vlretrieval/finished/{self.me}", "1", allow_overwrite=True)


_WATCHDOG: PeerWatchdog | None = None


def start_watchdog(timeout: float) -> None:
    global _WATCHDOG
    if jax.process_count() > 1:
        _WATCHDOG = PeerWatchdog(timeout).start()


def finish() -> None:
    """The end of a successful multi-host command: stop watching peers, then leave the runtime
    together (`jax.distributed.shutdown` waits for every process)."""
    if _WATCHDOG is not None:
        _WATCHDOG.finish()
    if jax.process_count() > 1:
        jax.distributed.shutdown()
