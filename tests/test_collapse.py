"""Collapse detection: a run stuck at the contrastive loss's chance value says so once, or stops."""

import math
import os
import subprocess
import sys

import pytest

from configs.demo import get_config
from vlretrieval.collapse import PATIENCE, CollapseWatch, RunCollapsed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _watch(**train):
    config = get_config()
    config.train.batch_size = 32
    config.train.update(train)
    return CollapseWatch(config)


def test_a_healthy_run_is_never_flagged_and_a_flat_one_once():
    watch = _watch()
    # The demo's first logged steps: near ln(B) at first, but with gradients of order 1-30.
    for step, (loss, norm) in enumerate([(3.45, 6.0), (3.40, 17.7), (3.1, 32.7), (2.2, 15.6)], 1):
        assert watch.observe(step, {"contrastive_loss": loss, "gradient_norm": norm}) is None
    flat = {"contrastive_loss": math.log(32) + 0.001, "gradient_norm": 0.05}
    said = [watch.observe(step, flat) for step in range(5, 5 + 3 * PATIENCE)]
    assert sum(message is not None for message in said) == 1  # once, not every log step
    assert "ln(32) = 3.466" in said[PATIENCE - 1] and "learning_rate" in said[PATIENCE - 1]
    # A sigmoid run has no single chance value: not watched.
    sigmoid = get_config()
    sigmoid.objectives.contrastive_loss = "sigmoid"
    assert not CollapseWatch(sigmoid).watched
    with pytest.raises(RunCollapsed, match="stop_on_collapse"):
        stopping = _watch(stop_on_collapse=True)
        for step in range(PATIENCE):
            stopping.observe(step, flat)


def _train(data_dir, workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(
        [sys.executable, "-m", "vlretrieval.cli", "train", "--config", "configs/demo.py:tiny", "--no_progress",
         "--workdir", workdir, "--data_dir", data_dir, "--config.train.log_every=1",
         "--config.train.num_steps=10", "--config.model.head.initial_temperature=1000.0", *extra],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )


def test_a_run_made_to_collapse_warns_once_or_stops_with_one_error(tmp_path):
    # A temperature of 1000 makes every logit ~0: the loss sits at ln(32), the gradient vanishes.
    data = str(tmp_path / "data")
    warned = _train(data, str(tmp_path / "warned"))
    assert warned.returncode == 0, warned.stderr
    lines = [line for line in warned.stderr.splitlines() if "collapsed" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), warned.stderr
    stopped = _train(data, str(tmp_path / "stopped"), "--config.train.stop_on_collapse=true")
    lines = stopped.stderr.strip().splitlines()
    assert stopped.returncode == 2 and len(lines) == 1, stopped.stderr
    assert lines[0].startswith("error: ") and "collapsed" in lines[0] and "stop_on_collapse" in lines[0]
