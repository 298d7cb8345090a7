"""Shared by the benchmarks that compare whole training runs: one `vlretrieval train` subprocess."""

import json
import os
import subprocess
import sys
import time


def train_and_read_results(
    config: str, workdir: str, data_dir: str, extra=(), devices: int = 1, seed: int | None = None,
    results_name: str = "results.json",
) -> dict:
    """Runs `vlretrieval train` (which evaluates at the end) on `devices` fake CPU devices, with
    `config.seed` set to `seed` if given, and returns its results (`results_name`: another
    evaluation mode's, e.g. results_topics.json) plus the wall time."""
    extra = [*extra, *([] if seed is None else [f"--config.seed={seed}"])]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "vlretrieval.cli", "train", "--config", config, "--workdir", workdir,
         "--data_dir", data_dir, "--no_progress", *extra],
        check=True, env=env,
    )
    with open(os.path.join(workdir, results_name)) as handle:
        results = json.load(handle)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results
