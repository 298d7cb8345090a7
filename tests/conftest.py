"""Test setup: 8 fake CPU devices, so sharded code runs as it would on a multi-device host.

XLA reads the flag when JAX initialises its backend, so it must be set before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
