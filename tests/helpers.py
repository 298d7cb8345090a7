"""Small model configs and numerical comparisons shared by the tests."""

import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from configs.demo import transformer


def tiny_model_config(kind: str = "decomposed", pre_norm: bool = True) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.kind = kind
    config.image_size = 16
    config.patch_size = 8
    config.max_text_length = 12
    for name in ("transformer", "image_transformer", "text_transformer"):
        section = transformer(width=32, depth=2, heads=4)
        section.pre_norm = pre_norm
        config[name] = section
    config.head = ml_collections.ConfigDict(
        dict(embed_dim=16, text_pooling="mean", image_pooling="cls",
             initial_temperature=0.07, max_logit_scale=100.0)
    )
    return config


def assert_close_relative(got, want, rtol=1e-5):
    """Each array within `rtol` of the reference, relative to the reference array's largest entry.

    Float32 sums taken in another order differ by ~1e-7 of their terms, not of the (possibly
    cancelled) sum; so gradients that are zero in exact arithmetic (an attention key's bias: the
    softmax ignores it) are held to 1e-6 of the largest gradient entry anywhere instead.
    """
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    overall = max(float(np.max(np.abs(np.asarray(b)))) for b in want_leaves)
    for path, a, b in zip(paths, got_leaves, want_leaves):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        tolerance = max(rtol * np.max(np.abs(b)), 1e-6 * overall)
        difference = np.max(np.abs(a - b))
        assert difference <= tolerance, f"{path}: differs by {difference:.3g} > {tolerance:.3g}"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {key: value for name, child in tree.items() for key, value in _flat(child, f"{prefix}{name}.").items()}


def assert_nested_close(got, want, rel=1e-6, abs=1e-6) -> None:
    """Two nested dicts of numbers (results) have the same keys and values within tolerance."""
    import pytest

    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=abs), key


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def run_local_hosts(script: str, outputs, count: int = 2, timeout: float = 240) -> None:
    """Runs `python -c script ADDRESS PROCESS_ID OUTPUT ROOT` as `count` local processes of one
    multi-host run (one CPU device each) and checks they all succeed; each writes `outputs[i]`."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    hosts = [
        subprocess.Popen([sys.executable, "-c", script, address, str(i), str(outputs[i]), ROOT],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(count)
    ]
    for host in hosts:
        output, _ = host.communicate(timeout=timeout)
        assert host.returncode == 0, output
