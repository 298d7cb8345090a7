"""Bad input ends in one clear `error:` line and exit status 2, with nothing written."""

import os
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "vlretrieval.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
        cwd=cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_config_key(tmp_path):
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
                     "--config.train.batch_sise=8")
    assert_one_line_error(result, "config.train.batch_sise", "did you mean config.train.batch_size")
    assert not (tmp_path / "w").exists()


def test_dataset_directory_that_is_not_a_dataset(tmp_path):
    not_a_dataset = tmp_path / "photos"
    not_a_dataset.mkdir()
    (not_a_dataset / "cat.txt").write_text("meow")
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
                     f"--config.data.dataset_dir={not_a_dataset}")
    assert_one_line_error(result, str(not_a_dataset))
    assert not (tmp_path / "w").exists()
    assert sorted(os.listdir(not_a_dataset)) == ["cat.txt"]


def test_tokenizer_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-tokenizer.json"
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
                     "--data_dir", str(tmp_path / "data"), f"--config.data.tokenizer={missing}")
    assert_one_line_error(result, str(missing))
    assert not (tmp_path / "w").exists()


def test_workdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(blocker / "w"),
                     "--data_dir", str(tmp_path / "data"))
    assert_one_line_error(result, str(blocker / "w"))
    assert blocker.read_text() == "keep me"
    assert not (tmp_path / "data").exists()  # failed before generating anything


def test_eval_without_a_checkpoint(tmp_path):
    (tmp_path / "w").mkdir()
    result = run_cli("eval", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
                     "--data_dir", str(tmp_path / "data"))
    assert_one_line_error(result, "no checkpoint")


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "demo", "prepare-data"):
        assert command in result.stdout


def test_a_diverging_loss_stops_with_one_line_and_no_checkpoint_for_it(tmp_path):
    workdir = tmp_path / "w"
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(workdir),
                     "--data_dir", str(tmp_path / "data"), "--no_progress",
                     "--config.optimizer.learning_rate=1e30", "--config.train.checkpoint_every=100")
    assert_one_line_error(result, "diverged", "learning_rate")
    # The only checkpoint a run of 6 steps would write is at step 6, after the NaN: none.
    assert not os.listdir(workdir / "checkpoints")


@pytest.mark.parametrize(
    "override, fragment",
    [("--config.train.batch_size=30", "config.train.batch_size 30 is not divisible by the 8 devices"),
     ("--config.train.num_devices=16", "config.train.num_devices is 16 but only 8 devices exist"),
     ("--config.train.accumulation_steps=3", "accumulation_steps 3 does not divide the 4 examples"),
     ("--config.objectives.contrastive_loss=sigmoid", "set config.model.head.logit_bias=true")],
)
def test_batch_mesh_and_objectives_that_cannot_run(tmp_path, override, fragment):
    # conftest.py's XLA_FLAGS reach the subprocess: it sees 8 fake CPU devices.
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
                     "--data_dir", str(tmp_path / "data"), override)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,fragment", [
    ("--config.model.dtype=float16", "config.model.dtype is 'float16'"),
    ("--config.model.attention=flash", "config.model.attention is 'flash'"),
    ("--config.model.transformer.remat=dots_savable", "unknown remat 'dots_savable'"),
    ("--config.model.attention=cudnn", "config.model.attention=cudnn needs a GPU"),
    ("--config.train.preemption_check_every=0", "preemption_check_every is 0; it must be an integer, 1 or more"),
])
def test_unknown_precision_attention_or_remat_is_refused_before_any_work(tmp_path, override, fragment):
    result = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
                     "--data_dir", str(tmp_path / "data"), override)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "w").exists() and not (tmp_path / "data").exists()
