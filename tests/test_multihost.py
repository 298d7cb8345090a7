"""Multi-host runs on local processes: same trajectory as one process, exact resume after SIGKILL
(also during an asynchronous save), SIGTERM pre-emption, a lost peer, a damaged checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import ROOT, free_port

TINY = ("--config", "configs/demo.py:tiny", "--no_progress")


def environment(devices: int, **extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def vlretrieval(*args, devices=1, env=None):
    """A `vlretrieval` process (not waited for), output to a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "vlretrieval.cli", *args], cwd=ROOT,
        env=env or environment(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(process, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as handle:
        for line in handle:
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass
    return steps


def wait_for_step(process, workdir, step, timeout=240):
    start = time.monotonic()
    while max(logged_steps(workdir), default=0) < step:
        assert process.poll() is None, finish(process)
        assert time.monotonic() - start < timeout, "training did not reach the step in time"
        time.sleep(0.05)


def saved_params(workdir, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return restored.state["params"]


def assert_params_equal(got, want, atol=1e-6):
    import jax

    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(want))
    assert len(got_leaves) == len(want_leaves)
    for path, leaf in got_leaves:
        difference = np.max(np.abs(np.asarray(leaf) - np.asarray(want_leaves[jax.tree_util.keystr(path)])))
        assert difference <= atol, f"{jax.tree_util.keystr(path)} differs by {difference}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("data"))
    prepared = vlretrieval("prepare-data", *TINY, "--data_dir", directory)
    output = finish(prepared)
    assert prepared.returncode == 0, output
    return directory


RESUME_RUN = ("--config.train.num_steps=12", "--config.train.checkpoint_every=3",
              "--config.train.log_every=1")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    process = vlretrieval("train", *TINY, *RESUME_RUN, "--workdir", workdir, "--data_dir", data_dir)
    output = finish(process)
    assert process.returncode == 0, output
    return workdir


def test_two_processes_follow_the_one_process_trajectory(data_dir, tmp_path):
    """2 processes x 2 devices vs 1 process x 4 devices, 50 steps of the demo config's smoke
    variant (`configs/demo.py:tiny`, to keep the suite short): the same losses within 1e-5."""
    run = (*TINY, "--data_dir", data_dir, "--config.train.num_steps=50",
           "--config.train.log_every=1", "--config.train.checkpoint_every=50")
    # Both runs at once: each is mostly compiling and starting up (the suite's time).
    alone = vlretrieval("train", *run, "--workdir", str(tmp_path / "one"), devices=4)
    launcher = subprocess.Popen(
        [sys.executable, "launch/local.py", "--processes", "2", "--devices_per_process", "2", "--",
         sys.executable, "-m", "vlretrieval.cli", "train", *run, "--workdir", str(tmp_path / "two")],
        cwd=ROOT, env=environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    launched, launch_errors = launcher.communicate(timeout=600)
    output = finish(alone)
    assert alone.returncode == 0, output
    assert launcher.returncode == 0, launched + launch_errors
    # Process 0 prints the run's lines; process 1 (which took part: the losses below need both
    # halves of the batch) prints only warnings and errors.
    assert "[0] model: decomposed" in launched and "[1] model:" not in launched

    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as handle:
            return {r["step"]: r["loss"] for r in map(json.loads, handle) if "loss" in r}

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 51))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=1e-5, atol=1e-5)


def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_parameters(data_dir, uninterrupted, tmp_path):
    reference = saved_params(uninterrupted, 12)
    # Killed between checkpoints (after step 5: the step-3 checkpoint is complete or, if its
    # asynchronous save was still running, absent) ...
    workdir = str(tmp_path / "killed")
    process = vlretrieval("train", *TINY, *RESUME_RUN, "--workdir", workdir, "--data_dir", data_dir)
    wait_for_step(process, workdir, 5)
    process.send_signal(signal.SIGKILL)
    finish(process)
    # ... and, on the restart, killed while the step-9 checkpoint is being written.
    during_save = environment(1, VLRETRIEVAL_TEST_KILL_DURING_SAVE_AT_STEP="9")
    process = vlretrieval("train", *TINY, *RESUME_RUN, "--workdir", workdir, "--data_dir", data_dir,
                          env=during_save)
    output = finish(process)
    assert process.returncode == -signal.SIGKILL, output
    # The latest complete checkpoint (step 6) is then damaged (a truncated file): the restart sets
    # it aside with a warning, resumes from step 3, and still ends with the same parameters.
    damaged = os.path.join(workdir, "checkpoints", "6")
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(damaged, "state"))
             for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:
        handle.truncate(os.path.getsize(largest) // 2)
    process = vlretrieval("train", *TINY, *RESUME_RUN, "--workdir", workdir, "--data_dir", data_dir)
    output = finish(process)
    assert process.returncode == 0, output
    assert "warning: skipping checkpoint" in output and damaged in output
    assert "resuming from the checkpoint at step 3" in output  # step 9 never completed, 6 damaged
    assert any(name.startswith("6.unreadable") for name in os.listdir(os.path.dirname(damaged)))
    assert_params_equal(saved_params(workdir, 12), reference)
    assert logged_steps(workdir) == list(range(1, 13))  # one clean trajectory, no repeats


def test_ctrl_c_during_a_save_saves_stops_with_one_line_and_resumes_exactly(data_dir, uninterrupted, tmp_path):
    # Ctrl-C while the step-3 checkpoint is being written: the save completes, the run goes on
    # to the next stop check (step 10), saves there and exits 130 with one line on stderr.
    workdir = str(tmp_path / "interrupted")
    process = subprocess.run(
        [sys.executable, "-m", "vlretrieval.cli", "train", *TINY, *RESUME_RUN, "--workdir", workdir,
         "--data_dir", data_dir], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=environment(1, VLRETRIEVAL_TEST_INTERRUPT_DURING_SAVE_AT_STEP="3"),
    )
    assert process.returncode == 130, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) <= 2 and "warning: interrupted (Ctrl-C) at step 10" in lines[-1], process.stderr
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1] == 10
    resumed = vlretrieval("train", *TINY, *RESUME_RUN, "--workdir", workdir, "--data_dir", data_dir)
    output = finish(resumed)
    assert resumed.returncode == 0 and "resuming from the checkpoint at step 10" in output, output
    assert_params_equal(saved_params(workdir, 12), saved_params(uninterrupted, 12), atol=1e-6)


def test_sigterm_saves_a_checkpoint_at_the_step_it_arrived(data_dir, tmp_path):
    workdir = str(tmp_path / "preempted")
    process = vlretrieval("train", *TINY, "--config.train.num_steps=100000",
                          "--config.train.checkpoint_every=1000", "--config.train.log_every=1",
                          "--workdir", workdir, "--data_dir", data_dir)
    wait_for_step(process, workdir, 3)
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, output
    line = next(line for line in output.splitlines() if "warning: pre-empted (SIGTERM)" in line)
    step = int(line.split("at step ")[1].split(":")[0])
    assert step >= 3
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.all_steps() == [step]  # saved where it stopped, nothing later
    manager.close()
    assert max(logged_steps(workdir)) == step


def test_sigterm_to_one_host_stops_every_host_at_the_same_checked_step(data_dir, tmp_path):
    # Only host 1 is signalled; the check is a collective every 4 steps, so both hosts see it at
    # the same multiple of 4, save that step together and exit as pre-empted.
    address = f"127.0.0.1:{free_port()}"
    workdir = str(tmp_path / "preempted_two_hosts")
    processes = [
        vlretrieval("train", *TINY, "--config.train.num_steps=100000", "--config.train.log_every=1",
                    "--config.train.checkpoint_every=1000", "--config.train.preemption_check_every=4",
                    "--workdir", workdir, "--data_dir", data_dir, "--coordinator_address", address,
                    "--num_processes", "2", "--process_id", str(index))
        for index in range(2)
    ]
    wait_for_step(processes[0], workdir, 3)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [finish(process) for process in processes]
    steps = []
    for process, output in zip(processes, outputs):
        assert process.returncode == 128 + signal.SIGTERM, output
        line = next(line for line in output.splitlines() if "warning: pre-empted (SIGTERM)" in line)
        steps.append(int(line.split("at step ")[1].split(":")[0]))
    assert steps[0] == steps[1] and steps[0] % 4 == 0 and steps[0] >= 4
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.all_steps() == [steps[0]]
    manager.close()


def test_losing_a_peer_stops_the_other_process_with_a_clear_line(data_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    workdir = str(tmp_path / "lost")
    processes = [
        vlretrieval("train", *TINY, "--config.train.num_steps=100000", "--config.train.log_every=1",
                    "--config.train.checkpoint_every=1000", "--workdir", workdir,
                    "--data_dir", data_dir, "--coordinator_address", address,
                    "--num_processes", "2", "--process_id", str(index), "--heartbeat_timeout", "20")
        for index in range(2)
    ]
    wait_for_step(processes[0], workdir, 2)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    output = finish(processes[0], timeout=150)
    assert time.monotonic() - killed_at < 120
    assert processes[0].returncode != 0
    assert "error: lost process 1" in output, output
    finish(processes[1])


def test_checkpoints_keep_the_last_k_plus_the_best_by_the_eval_metric(tmp_path):
    import jax.numpy as jnp
    import ml_collections

    from vlretrieval.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), keep_last=2, keep_best=1, best_metric="mean_recall")
    config = ml_collections.ConfigDict({"seed": 0})
    for step, recall in zip(range(1, 6), (50.0, 90.0, 30.0, 40.0, 20.0)):
        state = {"params": {"w": jnp.full((2, 2), float(step))}}
        checkpointer.save(step, state, config, {"image_text": {"next_index": step}},
                          metrics={"mean_recall": recall})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 4, 5]  # the best (step 2) and the last two
    step, state = checkpointer.restore_latest({"params": {"w": jnp.zeros((2, 2))}})
    assert step == 5 and float(state["params"]["w"][0, 0]) == 5.0
    assert checkpointer.restore_data_state(5) == {"image_text": {"next_index": 5}}
    checkpointer.close()


def test_multi_host_flags_are_checked_before_anything_starts():
    from vlretrieval.errors import UserError
    from vlretrieval.parallel import hosts

    with pytest.raises(UserError, match="needs all of --coordinator_address"):
        hosts.host_setup(coordinator_address="127.0.0.1:1234", environ={})
    with pytest.raises(UserError, match="not in \\[0, --num_processes 2\\)"):
        hosts.host_setup("127.0.0.1:1234", 2, 2, environ={})
    with pytest.raises(UserError, match="must be HOST:PORT"):
        hosts.host_setup("localhost", 2, 0, environ={})
    launched = hosts.host_setup(environ={"VLRETRIEVAL_COORDINATOR_ADDRESS": "127.0.0.1:9",
                                         "VLRETRIEVAL_NUM_PROCESSES": "2",
                                         "VLRETRIEVAL_PROCESS_ID": "1"})
    assert (launched.coordinator_address, launched.num_processes, launched.process_id) == (
        "127.0.0.1:9", 2, 1)
    alone = hosts.host_setup(environ={})
    assert not hosts.initialize(alone, environ={})  # one process: nothing to join


def test_evaluations_during_training_rank_the_kept_checkpoints(data_dir, tmp_path):
    workdir = str(tmp_path / "ranked")
    process = vlretrieval("train", *TINY, "--workdir", workdir, "--data_dir", data_dir,
                          "--config.train.eval_every=2", "--config.train.keep_last=1",
                          "--config.train.keep_best=1")
    output = finish(process)
    assert process.returncode == 0, output
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        recalls = {r["step"]: r["eval_mean_recall"] for r in map(json.loads, handle)
                   if "eval_mean_recall" in r}
    assert sorted(recalls) == [2, 4, 6]
    best = max(recalls, key=lambda step: (recalls[step], step))  # a tie keeps the later one
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.all_steps() == sorted({best, 6})  # the best evaluation and the last step
    manager.close()
