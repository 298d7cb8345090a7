"""Test setup: 8 fake CPU devices, so sharded code runs as it would on a multi-device host.

XLA reads the flag when JAX initialises its backend, so it must be set before anything imports jax.
A persistent compilation cache shared by this test session and the processes it starts: many
tests run the same small programs in fresh processes (CLI runs, local multi-host runs), and
compiling them again each time was most of the suite's time. The cache is keyed by the program,
the compile options and the JAX/XLA version, so a hit runs exactly what a fresh compile would.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="vlretrieval-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # the session's, not reused
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
