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

import pytest

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


@pytest.fixture(scope="session")
def short_demo_run(tmp_path_factory):
    """The demo's smoke config widened (64 wide, 2 layers) and trained 250 steps on 2,048 images,
    one device, then evaluated on 100 test images: (config, workdir, results). Shared by the tests
    that need a model which has learnt (test_train's, test_zero_shot's): one run for both."""
    from vlretrieval.config import load_config
    from vlretrieval.train import train_and_evaluate

    data_dir, workdir = (str(tmp_path_factory.mktemp(name)) for name in ("short_run_data", "short_run"))
    config = load_config("configs/demo.py:tiny", [
        f"data.data_dir={data_dir}", "data.num_train=2048", "data.num_test=100",
        "model.transformer.width=64", "model.transformer.depth=2", "model.transformer.num_heads=4",
        "model.transformer.mlp_dim=128", "model.head.embed_dim=64", "train.batch_size=64",
        "train.num_steps=250", "train.log_every=50", "train.checkpoint_every=250",
        "optimizer.learning_rate=0.003", "optimizer.warmup_steps=20", "eval.batch_size=104",
        "train.num_devices=1",  # learning, not sharding (test_sharded_step.py): one device compiles faster
    ])
    return config, workdir, train_and_evaluate(config, workdir, progress=False)

