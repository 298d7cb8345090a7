"""The continual protocol (`vlretrieval continual`): task records, the score matrices and
forgetting, the mitigations, and bad input refused before any training."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.helpers import ROOT, tiny_model_config
from vlretrieval import cli
from vlretrieval import train as train_module
from vlretrieval.checkpoint import read_saved_params
from vlretrieval.config import load_config
from vlretrieval.continual import protocol, results
from vlretrieval.continual.runner import run_continual
from vlretrieval.data import datasets, subsets
from vlretrieval.data.builders import demo_scenes
from vlretrieval.errors import UserError
from vlretrieval.evaluation import checkpoints
from vlretrieval.evaluation import index as index_file
from vlretrieval.models import build_model, init_params

DEMO_TASKS = os.path.join(ROOT, "configs", "continual_demo_tasks.json")
# One device, English only, two steps a task: the protocol, not learning.
SMALL = ("train.num_devices=1", "train.num_steps=2", "train.checkpoint_every=2", "train.log_every=1",
         "data.languages=('en',)", "eval.batch_size=32")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny demo set (256 train, 64 test images), built once for the module."""
    directory = str(tmp_path_factory.mktemp("continual_data"))
    datasets.open_dataset(load_config("configs/demo.py:tiny", [f"data.data_dir={directory}"]).data, seed=0)
    return directory


def tiny_config(data_dir, *overrides):
    return load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}", *SMALL, *overrides])


def write_tasks(path, tasks) -> str:
    path.write_text(json.dumps({"tasks": tasks}))
    return str(path)


def test_a_filter_selects_exactly_the_scenes_whose_first_object_matches(data_dir, tmp_path):
    config = tiny_config(data_dir)
    tasks = protocol.read_tasks(write_tasks(tmp_path / "tasks.json", [
        {"name": "circles", "filter": {"shape": "circle"}},
        {"name": "red_squares", "filter": {"shape": "square", "colour": "red"}, "steps": 7,
         "data": {"max_text_length": 16}}]), config)
    # A task's steps and data overrides are its own config's, not the experiment's.
    assert [task.config.train.num_steps for task in tasks] == [2, 7] and config.train.num_steps == 2
    assert tasks[1].config.model.max_text_length == 16 and tasks[0].config.model.max_text_length == 32
    data = datasets.open_dataset(config.data, seed=0)
    for split, count in (("train", 256), ("test", 64)):
        # The truth: the scenes as drawn (image_id i is the i-th; tfds stores records in its own order).
        drawn = list(demo_scenes.split_scenes(0, split, count))
        first = [drawn[int(data.split(split)[p]["image_id"])].objects[0] for p in range(count)]
        circles = protocol.select(data.split(split), tasks[0], split)
        assert circles == [p for p, obj in enumerate(first) if obj.shape == "circle"]
        red_squares = protocol.select(data.split(split), tasks[1], split)
        assert red_squares == [p for p, obj in enumerate(first) if (obj.shape, obj.colour) == ("square", "red")]
        assert 0 < len(red_squares) < len(circles) < count
    # The demo's tasks (first object's shape) are disjoint.
    demo = protocol.read_tasks(DEMO_TASKS, config)
    selected = [set(protocol.select(data.split("train"), task, "train")) for task in demo]
    assert len(demo) == 3 and all(selected) and not (selected[0] & selected[1] or selected[1] & selected[2])
    # config.data.subset: the split read through it is exactly those records, in that order.
    subsets.write_subset(str(tmp_path / "subset.json"), {"train": circles})
    view = datasets.open_dataset(tiny_config(data_dir, f"data.subset={tmp_path / 'subset.json'}").data, seed=0)
    assert len(view.split("train")) == view.training_examples() == len(circles)
    assert ([view.split("train")[i]["image_id"] for i in range(len(circles))]
            == [data.split("train")[p]["image_id"] for p in circles])
    assert len(view.split("test")) == 64  # a split the file does not name is whole


def test_a_filter_that_selects_nothing_names_the_task():
    task = protocol.Task(2, "squares", {"shape": "square"}, None)
    with pytest.raises(UserError, match=r"task 2 \(squares\).*selects no record of the 'test' split"):
        protocol.select([{"description": b"left-to-right: small red circle, large blue square"}], task, "test")


def test_forgetting_and_final_score_by_hand():
    rows = [[50.0, 10.0, 5.0], [40.0, 60.0, 8.0], [30.0, 45.0, 70.0]]
    # Task 1: best before the end max(50, 40) = 50, final 30; task 2: 60 -> 45. Mean (20 + 15) / 2.
    assert results.average_forgetting(rows) == pytest.approx(17.5)
    assert results.average_final(rows) == pytest.approx((30 + 45 + 70) / 3)
    # Entries before a task was learnt (10 and 5, 8) never count; `keep` has none (None).
    keep = [[50.0, None, None], [40.0, 60.0, None], [55.0, 45.0, 70.0]]
    assert results.average_forgetting(keep) == pytest.approx(((50 - 55) + (60 - 45)) / 2)
    # After two rows: one task, learnt in row 1; the final row's average covers the trained tasks only.
    assert results.average_forgetting(rows[:2]) == pytest.approx(10.0)
    assert results.average_final(rows[:2]) == pytest.approx(50.0)
    assert results.average_forgetting(rows[:1]) is None


def _recorded_records(folder) -> list[int]:
    """The split positions task `folder` trained on (train.record_batches, through its subset). A
    recorded key past the first epoch is epoch x records + position (grain's index), hence the %."""
    positions = json.load(open(os.path.join(folder, "subset.json")))["train"]
    with open(os.path.join(folder, "batches.process_0.jsonl")) as handle:
        keys = [int(key) for line in handle for key in json.loads(line)["keys"]]
    return [positions[key % len(positions)] for key in keys]


def _flat_params(folder) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(read_saved_params(folder)[0], sep="/")


def test_three_tasks_write_both_matrices_the_indexes_and_the_report_with_a_frozen_image_tower(data_dir, tmp_path):
    config = tiny_config(data_dir, "continual.mitigation=frozen_image_tower", "train.record_batches=true")
    workdir = str(tmp_path / "run")
    summary = run_continual(config, workdir, protocol.read_tasks(DEMO_TASKS, config), progress=False)

    written = json.load(open(os.path.join(workdir, "continual.json")))
    assert written["tasks"] == ["circles", "squares", "triangles"] and written["tasks_trained"] == 3
    metrics = ["mean_recall", *(f"{d}/R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))]
    for policy in ("reindex", "keep"):
        result = written["policies"][policy]
        assert list(result["matrices"]) == metrics
        for metric, matrix in result["matrices"].items():
            assert np.shape(matrix) == (3, 3)
            for t in range(3):
                for j in range(3):
                    if policy == "keep" and j > t:
                        assert matrix[t][j] is None  # no index of a task not yet learnt
                    else:
                        assert 0 <= matrix[t][j] <= 100
            assert result["average_forgetting"][metric] == pytest.approx(results.average_forgetting(matrix))
            assert result["average_final"][metric] == pytest.approx(results.average_final(matrix))
    assert written == json.loads(json.dumps(summary))
    markdown = open(os.path.join(workdir, "continual.md")).read()
    assert "## reindex" in markdown and "## keep" in markdown and "| 3 triangles |" in markdown
    assert open(os.path.join(workdir, "continual.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    data = datasets.open_dataset(config.data, seed=0)
    folders = [os.path.join(workdir, name) for name in ("task_1_circles", "task_2_squares", "task_3_triangles")]
    for folder, shape in zip(folders, ("circle", "square", "triangle")):
        # Each task trained on its own records only: config.data.subset changes what is read.
        trained = _recorded_records(folder)
        assert len(trained) == 2 * 32
        descriptions = [data.split("train")[position]["description"] for position in trained]
        assert {protocol.first_object(d.decode() if isinstance(d, bytes) else d)[2] for d in descriptions} == {shape}
        # Its test gallery's index: the test records of the task, saved after it.
        test_positions = json.load(open(os.path.join(folder, "subset.json")))["test"]
        saved = index_file.read_index(os.path.join(folder, "index.safetensors"))
        assert saved.item_ids == [str(data.split("test")[p]["image_id"]) for p in test_positions] and saved.step == 2

    # The image tower frozen after task 1: every parameter the image embedding reads is as task 1
    # left it, the rest trained on; so the galleries did not move, and keeping an old index
    # scores what re-indexing does.
    first = _flat_params(folders[0])
    image_tower = [path for path in first if re.fullmatch(protocol.IMAGE_TOWER["decomposed"], path)]
    assert image_tower and any(path.startswith("joint/encoder/") for path in image_tower)
    for folder in folders[1:]:
        later = _flat_params(folder)
        for path in image_tower:
            np.testing.assert_array_equal(first[path], later[path], err_msg=path)
        assert any(np.any(first[path] != later[path]) for path in first if path not in image_tower)
    reindex, keep = (written["policies"][p]["matrices"]["mean_recall"] for p in ("reindex", "keep"))
    for t in range(3):
        np.testing.assert_allclose(keep[t][: t + 1], reindex[t][: t + 1], atol=1e-4)

    # A task folder is a normal run: `eval` with its overrides (task.json) scores what the matrix says.
    overrides = json.load(open(os.path.join(folders[2], "task.json")))["overrides"]
    assert any(o.startswith("--config.optimizer.freeze=") for o in overrides)
    task_config = tiny_config(data_dir, "eval.report=false", *(override[len("--config."):] for override in overrides))
    evaluated = checkpoints.evaluate_checkpoint(task_config, folders[2])
    assert evaluated["average"]["mean_recall"] == pytest.approx(reindex[2][2], abs=1e-4)


def test_lwf_distils_each_task_from_the_previous_one(data_dir, tmp_path):
    config = tiny_config(data_dir, "continual.mitigation=lwf", "continual.distillation_weight=0.5")
    tasks = protocol.read_tasks(write_tasks(tmp_path / "tasks.json", [
        {"name": "circles", "filter": {"shape": "circle"}}, {"name": "squares", "filter": {"shape": "square"}},
        {"name": "triangles", "filter": {"shape": "triangle"}}]), config)
    workdir = tmp_path / "run"
    run_continual(config, str(workdir), tasks, progress=False)
    saved = [read_saved_params(str(workdir / name))[0] for name in ("task_1_circles", "task_2_squares",
                                                                    "task_3_triangles")]
    assert "teacher" not in saved[0]
    students = [saved[0], saved[1]["student"], saved[2]["student"]]
    for t in (1, 2):  # the teacher is the previous task's final model (task 3's: task 2's student)
        teacher = traverse_util.flatten_dict(saved[t]["teacher"], sep="/")
        for path, value in traverse_util.flatten_dict(students[t - 1], sep="/").items():
            np.testing.assert_array_equal(teacher[path], value, err_msg=path)
    task = json.load(open(workdir / "task_3_triangles" / "task.json"))
    assert "--config.objectives.distillation=0.5" in task["overrides"]
    assert task["trained_from"] == str(workdir / "task_2_squares")


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_the_image_tower_pattern_covers_every_parameter_the_image_embedding_reads(kind):
    model = build_model(tiny_model_config(kind), vocab_size=50)
    # Random values of every parameter's shape (traced, not compiled: init_params compiles for long).
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = {path: rng.normal(size=leaf.shape).astype(np.float32)
              for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items()}
    frozen = {path: re.fullmatch(protocol.IMAGE_TOWER[kind], path) is not None for path in params}
    # Every parameter left trainable redrawn: the image embeddings must not move.
    redrawn = {path: value if frozen[path] else rng.normal(size=value.shape).astype(np.float32)
               for path, value in params.items()}
    embed = jax.jit(lambda p: model.apply({"params": traverse_util.unflatten_dict(p, sep="/")},
                                          jnp.ones((2, 16, 16, 3)), method=model.encode_image))
    np.testing.assert_array_equal(embed(params), embed(redrawn))
    if kind == "dual":  # separate towers: nothing of the text tower is frozen
        assert all(frozen[path] == (not path.startswith(("text_", "logit_scale"))) for path in params)
    else:  # the shared encoder is the image tower's too; the text embeddings stay trainable
        assert frozen["joint/encoder/final_norm/scale"]
        assert not any(frozen[path] for path in params if path.startswith("joint/text_embeddings/"))


def _refused(capsys, monkeypatch, workdir, *args):
    """`vlretrieval continual ...` in this process: exit 2, one `error:` line, nothing trained or written."""
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["continual", "--config", "configs/demo.py:tiny", "--workdir", str(workdir), "--no_progress", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not os.path.exists(workdir)
    return lines[0]


@pytest.mark.parametrize("case, fragment", [
    ("unknown_mitigation", "config.continual.mitigation is 'replay'"),
    ("missing_file", "No such file"),
    ("malformed_json", "is not JSON"),
    ("unknown_filter_key", "unknown filter key 'size'"),
    ("one_task", "has 1 task(s)"),
    ("unknown_data_key", "task 2 (squares): unknown config key config.data.num_trains"),
])
def test_bad_input_is_one_line_before_any_training(case, fragment, tmp_path, capsys, monkeypatch):
    tasks = tmp_path / "tasks.json"
    squares = {"name": "squares", "filter": {"shape": "square"}}
    circles = {"name": "circles", "filter": {"shape": "circle"}}
    args = ["--tasks", str(tasks)]
    if case == "unknown_mitigation":
        write_tasks(tasks, [circles, squares])
        args.append("--config.continual.mitigation=replay")
    elif case == "malformed_json":
        tasks.write_text('{"tasks": [')
    elif case == "unknown_filter_key":
        write_tasks(tasks, [circles, {"name": "small", "filter": {"size": "small"}}])
    elif case == "one_task":
        write_tasks(tasks, [circles])
    elif case == "unknown_data_key":
        write_tasks(tasks, [circles, {**squares, "data": {"num_trains": 5}}])
    assert fragment in _refused(capsys, monkeypatch, tmp_path / "run", *args)


def test_the_command_refuses_bad_input_with_exit_status_2(tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "circles", "filter": {"shape": "circel"}},
                                                               {"name": "squares"}]}))
    result = subprocess.run(
        [sys.executable, "-m", "vlretrieval.cli", "continual", "--config", "configs/demo.py:tiny", "--workdir",
         str(tmp_path / "run"), "--tasks", str(tmp_path / "tasks.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --tasks " + str(tmp_path / "tasks.json") + ": task 1 (circles): filter shape 'circel' is none of "
        "circle, square, triangle, diamond, cross"], result.stderr
    assert not (tmp_path / "run").exists()
