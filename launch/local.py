#!/usr/bin/env python3
"""Starts N processes of one multi-host run on this machine (127.0.0.1), as a cluster would.

  python launch/local.py --processes 2 --devices_per_process 2 -- \\
      .venv/bin/vlretrieval train --config configs/demo.py --workdir workdir/two_hosts

Each process gets the coordinator address, the process count and its id through the environment
(`VLRETRIEVAL_COORDINATOR_ADDRESS`, `VLRETRIEVAL_NUM_PROCESSES`, `VLRETRIEVAL_PROCESS_ID`, read by
`vlretrieval.parallel.hosts`) and, with `--devices_per_process`, that many fake CPU devices (gloo
collectives between the processes). Their output is relayed line by line, prefixed `[i]`.
SIGTERM and Ctrl-C are passed on to every process (pre-emption: each saves and stops). When a
process fails, the launcher names it; the others are stopped by JAX's runtime once they miss its
heartbeats, or by the launcher after `--grace` seconds. Exit status: 0 if every process succeeded,
else the first failing process's status (128 + signal number for a signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def process_environment(index: int, count: int, address: str, devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLRETRIEVAL_COORDINATOR_ADDRESS=address,
        VLRETRIEVAL_NUM_PROCESSES=str(count),
        VLRETRIEVAL_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",  # lines arrive as they are printed, not when a buffer fills
    )
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def relay(index: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="fake CPU devices per process (default: the real devices)")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds the others get to stop by themselves after one fails")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.processes < 1:
        parser.error("give --processes >= 1 and a command after --")

    address = f"127.0.0.1:{free_port()}"
    children = []
    for index in range(args.processes):
        children.append(subprocess.Popen(
            command, env=process_environment(index, args.processes, address, args.devices_per_process),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    relays = [threading.Thread(target=relay, args=(i, c.stdout), daemon=True)
              for i, c in enumerate(children)]
    for thread in relays:
        thread.start()

    def forward(signum, frame):
        del frame
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    first_failure: tuple[int, int] | None = None
    deadline = None
    while any(child.poll() is None for child in children):
        for index, child in enumerate(children):
            code = child.poll()
            if code not in (None, 0) and first_failure is None:
                first_failure = (index, code)
                deadline = time.monotonic() + args.grace
                print(f"launch: process {index} (pid {child.pid}) {describe(code)}; waiting up to "
                      f"{args.grace:.0f} s for the others to stop", file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            for index, child in enumerate(children):
                if child.poll() is None:
                    print(f"launch: stopping process {index}, still running after process "
                          f"{first_failure[0]} failed", file=sys.stderr, flush=True)
                    child.kill()
        time.sleep(0.2)
    for thread in relays:
        thread.join(timeout=5)
    for index, child in enumerate(children):
        if child.returncode != 0 and first_failure is None:
            first_failure = (index, child.returncode)
    if first_failure is None:
        return 0
    for index, child in enumerate(children):
        if child.returncode != 0 and index != first_failure[0]:
            print(f"launch: process {index} {describe(child.returncode)}", file=sys.stderr)
    return exit_status(first_failure[1])


if __name__ == "__main__":
    sys.exit(main())
