"""The catalogue of bad input: every case ends in exit 2 and one `error:` line, before any work.

Each case runs a real command (subprocess, the tiny demo config) against a prepared dataset and a
trained run, and checks: exit status 2, exactly one line on stderr and it starts `error:`, no
traceback anywhere, nothing printed as a result, and the data and run folders byte for byte as
they were (nothing written, renamed or removed). Then the damaged-checkpoint cases: `eval` is
read-only and names the damaged step; with --fallback it scores the previous one and says which.
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--config", "configs/demo.py:tiny", "--no_progress")


def run(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def cli(*args):
    return run("-m", "vlretrieval.cli", *args)


def snapshot(*folders) -> dict[str, str]:
    """Every file under the folders with its content hash: what a refused command must not touch."""
    found = {}
    for folder in folders:
        for directory, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    found[path] = hashlib.sha256(handle.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    """(data dir, a trained run's workdir with checkpoints at steps 2 and 4, a scratch dir)."""
    base = tmp_path_factory.mktemp("bad_input")
    data, workdir = str(base / "data"), str(base / "run")
    trained = cli("train", *TINY, "--workdir", workdir, "--data_dir", data,
                  "--config.train.num_steps=4", "--config.train.checkpoint_every=2")
    assert trained.returncode == 0, trained.stderr
    scratch = base / "scratch"
    scratch.mkdir()
    (scratch / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (scratch / "a_file").write_text("not a folder\n")
    for number in range(2):  # an image folder of two classes, for the benchmark suite cases
        (scratch / "shapes" / "test" / f"class_{number}").mkdir(parents=True)
    suites = {
        "unknown_task": {"name": "x", "task": "ocr", "split": "test", "dataset": {}},
        "unknown_key": {"name": "x", "task": "zero_shot_classification", "split": "test",
                        "dataset": {"layout": "image_folder", "rot": "/x"},
                        "templates": "configs/zero_shot/simple_templates.json"},
        "wrong_classes": {"name": "x", "task": "zero_shot_classification", "split": "test",
                          "dataset": {"layout": "image_folder", "root": str(scratch / "shapes"),
                                      "classes": ["class 0", "class 9"]},
                          "templates": "configs/zero_shot/simple_templates.json"},
    }
    for name, task in suites.items():
        (scratch / f"suite_{name}.json").write_text(json.dumps({"tasks": [task]}))
    (scratch / "tsv").mkdir()
    (scratch / "tsv" / "en-de.tsv").write_bytes("red square\tcaf\xe9 rot\n".encode("latin-1"))
    # Region features: SCAN's layout with 14 caption lines for 3 images, a feature file 32 wide.
    (scratch / "scan_short").mkdir()
    np.save(scratch / "scan_short" / "test_ims.npy", np.zeros((3, 2, 64), np.float32))
    (scratch / "scan_short" / "test_caps.txt").write_text("a caption\n" * 14)
    (scratch / "regions_wide" / "features").mkdir(parents=True)
    (scratch / "regions_wide" / "captions.jsonl").write_text('{"image": "x", "captions": ["a caption"]}\n')
    np.save(scratch / "regions_wide" / "features" / "x.npy", np.zeros((2, 32), np.float32))
    return data, workdir, str(scratch)


# (command and arguments, a fragment of the error line); {train} and the others below stand for the
# command with the tiny config, a workdir and the data dir.
COMMANDS = {
    "train": "train {tiny} --workdir {scratch}/w --data_dir {data}",
    "eval": "eval {tiny} --workdir {run} --data_dir {data}",
    "index": "index {tiny} --workdir {run} --data_dir {data}",
    "search": "search {tiny} --workdir {run} --data_dir {data}",
}
CASES = [
    # train: settings checked when the config loads, evaluation-only ones included
    ("{train} --config.train.num_steps=-5", "config.train.num_steps is -5"),
    ("{train} --config.train.batch_size=0", "config.train.batch_size is 0"),
    ("{train} --config.train.log_every=0", "config.train.log_every is 0"),
    ("{train} --config.train.keep_last=0", "config.train.keep_last is 0"),
    ("{train} --config.train.best_metric=R@1", "config.train.best_metric"),
    ("{train} --config.optimizer.learning_rate=0", "learning_rate is 0.0"),
    ("{train} --config.optimizer.b2=1.5", "config.optimizer.b2 is 1.5"),
    ("{train} --config.data.crop_scale=(0.8,0.2)", "config.data.crop_scale"),
    ("{train} --config.data.on_bad_record=ignore", "on_bad_record is 'ignore'"),
    ("{train} --config.eval.mode=fast", "config.eval.mode is 'fast'"),
    ("{train} --config.eval.score_dtype=float16", "eval.score_dtype"),
    ("{train} --config.eval.recall_at=(0,5)", "config.eval.recall_at"),
    ("{train} --config.eval.metrics=('recall','precision')",
     "unknown metric 'precision'"),
    ("{train} --config.eval.split=dev", "split 'dev' is not in the dataset"),
    ("{train} --config.eval.ties=random", "config.eval.ties is 'random'"),
    ("{train} --config.objectives.hardest_negative_hinge=-1.0",
     "hardest_negative_hinge is a weight"),
    ("{train} --config.objectives.image_mix_fraction=2.0",
     "image_mix_fraction is 2.0"),
    ("{train} --config.objectives.contrastiv=1.0", "unknown config key"),
    # region inputs: a model that wants regions on pixel data, region terms on a patch model
    ("{train} --config.model.image_input=regions", "holds images, not region features"),
    ("{train} --config.model.image_input=boxes", "config.model.image_input is 'boxes'"),
    ("{train} --config.objectives.masked_region_features=1.0", "it needs config.model.image_input=regions"),
    ("{train} --config.objectives.late_interaction_aggregation=max_max", "late_interaction_aggregation"),
    ("{train} --config.objectives.text_text=0.5 --config.bitext.tsv_dir={scratch}/tsv", "is not UTF-8 text"),
    # distillation and hashing: no such teacher, a term with no teacher, a code length not in bytes
    ("{train} --config.distill.teacher={scratch}/no_teacher --config.objectives.distillation=1.0", "does not exist"),
    ("{train} --config.objectives.distillation=1.0", "set config.distill.teacher"),
    ("{train} --config.model.head.hash_bits=12", "config.model.head.hash_bits is 12"),
    ("train {tiny} --workdir {scratch}/a_file --data_dir {data}", "is a file"),
    ("train --config configs/missing.py --workdir {scratch}/w", "does not exist"),
    # eval
    ("{eval} --config.eval.max_images=-1", "config.eval.max_images is -1"),
    ("{eval} --mode rerank --shortlist 0", "config.eval.shortlist is 0"),
    ("{eval} --config.eval.batch_size=0", "config.eval.batch_size is 0"),
    ("{eval} --mode fast", "invalid choice: 'fast'"),
    ("{eval} --step 3", "no checkpoint at step 3"),
    ("eval {tiny} --workdir {scratch}/nothing_here --data_dir {data}", "no checkpoint in"),
    # training from webdataset shards: the spec and the shards are checked before any work
    ("{train} --config.data.name=webdataset --config.data.shards={scratch}/none/*.tar", "matches no file"),
    ("{train} --config.data.name=webdataset --config.data.shards={scratch}/a_file", "is not a tar file"),
    ("{train} --config.data.name=webdataset --config.data.caption_fields=en", "is not LANGUAGE=FIELD"),
    ("{train} --config.data.shuffle_buffer=0", "config.data.shuffle_buffer is 0"),
    ("{train} --config.data.eval_dataset_dir={data}", "only data.name=webdataset reads it"),
    # index and search
    ("{index} --output {scratch}", "is a directory"),
    ("{index} --output {scratch}/a_file/index.safetensors", "is not a directory"),
    ("{index} --output {scratch}/i.safetensors --config.eval.gallery_chunk=0",
     "config.eval.gallery_chunk is 0"),
    ("{search} --index {scratch}/i.safetensors --query red --k 0", "--k is 0"),
    ("{search} --index {scratch}/missing.safetensors --query red", "missing"),
    ("{search} --index {scratch}/i.safetensors --queries_file {scratch}/latin1.txt",
     "is not UTF-8 text"),
    ("{search} --index {scratch}/i.safetensors --queries_file {scratch}/none.txt",
     "No such file"),
    # benchmark suites: the whole file is checked before any model work
    ("benchmark {tiny} --workdir {run} --data_dir {data} --suite {scratch}/suite_unknown_task.json",
     "unknown task 'ocr'"),
    ("benchmark {tiny} --workdir {run} --data_dir {data} --suite {scratch}/suite_unknown_key.json",
     "unknown image_folder dataset key 'rot'"),
    ("benchmark {tiny} --workdir {run} --data_dir {data} --suite {scratch}/suite_wrong_classes.json",
     "names without a class: 'class 9'"),
    ("benchmark {tiny} --workdir {run} --data_dir {data} --suite {scratch}/missing.json", "does not exist"),
    # convert
    ("convert --from hf {scratch}/no_model --to {scratch}/out", "no_model"),
    ("convert --from vlretrieval {run} --to-hf {scratch}/out --arch gpt", "gpt"),
    ("convert --from onnx {run} --to {scratch}/out", "onnx"),
    ("convert --from hf {scratch}/no_model --to {scratch}/a_file", "already exists"),
    ("convert --from hf {scratch}/no_model --to {scratch}/a_file/out", "is not a directory"),
    # prepare-data
    ("prepare-data {tiny} --data_dir {scratch}/d --config.data.num_train=0", "config.data.num_train is 0"),
    ("prepare-data {tiny} --data_dir {scratch}/d --config.data.max_text_length=1", "max_text_length is 1"),
    ("prepare-data {tiny} --data_dir {scratch}/d --config.data.languages=()", "config.data.languages"),
    ("prepare-data {tiny} --data_dir {scratch}/d --config.data.name=region_files --config.data.tokenizer=unused "
     "--config.data.manual_dir={scratch}/regions_wide", "x.npy: region features are 32 wide but "
     "config.data.region_feature_dim is 64"),
    ("prepare-data {tiny} --data_dir {scratch}/d --config.data.name=precomputed_regions --config.data.tokenizer=unused "
     "--config.data.manual_dir={scratch}/scan_short", "test_caps.txt has 14 lines but"),
    # benchmark scripts
    ("benchmarks/loss_memory.py --global_batch 0", "--global_batch: 0 must be 1 or more"),
    ("benchmarks/search_speed.py --k 0", "--k: 0 must be 1 or more"),
    ("benchmarks/train_throughput.py --suite gpu", "invalid choice: 'gpu'"),
]


def _command(case: str) -> str:
    return "benchmarks" if case.startswith("benchmarks/") else case.split()[0].strip("{}")


def test_the_catalogue_has_every_command():
    commands = {_command(case) for case, _ in CASES}
    assert commands == {"train", "eval", "index", "search", "convert", "prepare-data", "benchmark", "benchmarks"}
    assert len(CASES) >= 30


def _run_case(case: str, names: dict):
    commands = {name: command.format(**names) for name, command in COMMANDS.items()}
    arguments = case.format(**names, **commands).split()
    return run(*arguments) if arguments[0].startswith("benchmarks/") else cli(*arguments)


TEST_NAME = "test_bad_input_ends_in_one_error_line_and_touches_nothing"


@pytest.fixture(scope="module")
def outcomes(run_folders, request):
    """Every selected case's command, run two at a time in the background from the first test on:
    each is its own process (most of its time is starting Python and JAX), and the machine has
    two cores. With the folders' snapshot from before any of them ran: a case that wrote anything
    fails every test that checks after it."""
    data, workdir, scratch = run_folders
    names = dict(tiny=" ".join(TINY), data=data, run=workdir, scratch=scratch)
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == TEST_NAME]
    before = snapshot(data, workdir, scratch)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield before, {case: pool.submit(_run_case, case, names) for case in selected}


@pytest.mark.parametrize("case,fragment", CASES, ids=[f"{_command(case)}-{i}" for i, (case, _) in enumerate(CASES)])
def test_bad_input_ends_in_one_error_line_and_touches_nothing(run_folders, outcomes, case, fragment):
    data, workdir, scratch = run_folders
    before, futures = outcomes
    result = futures[case].result()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.strip() == "" or "results" not in result.stdout.lower(), result.stdout
    assert snapshot(data, workdir, scratch) == before


def _damage_latest(workdir: str) -> str:
    """Truncates the largest data file of the newest checkpoint; returns that checkpoint's folder."""
    checkpoints = os.path.join(workdir, "checkpoints")
    latest = os.path.join(checkpoints, str(max(int(s) for s in os.listdir(checkpoints) if s.isdigit())))
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(latest, "state")) for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:
        handle.truncate(os.path.getsize(largest) // 2)
    return latest


def test_eval_is_read_only_and_names_a_damaged_latest_checkpoint(run_folders, tmp_path):
    data, trained, _ = run_folders
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    damaged = _damage_latest(workdir)
    before = snapshot(workdir)
    for _ in range(3):  # the same single line every time, no library noise
        result = cli("eval", *TINY, "--workdir", workdir, "--data_dir", data)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"error: checkpoint {damaged} cannot be read") and "--step 2" in lines[0]
        assert snapshot(workdir) == before  # nothing renamed, removed or (over)written
    # Told to fall back, it scores step 2, says so in one warning line, and records the step.
    result = cli("eval", *TINY, "--workdir", workdir, "--data_dir", data, "--fallback")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("warning: ") and "using step 2" in lines[0]
    assert os.path.isdir(damaged)
    import json

    with open(os.path.join(workdir, "results.json")) as handle:
        results = json.load(handle)
    assert results["step"] == 2 and len(results["config_hash"]) == 16
    # --step names one explicitly.
    result = cli("eval", *TINY, "--workdir", workdir, "--data_dir", data, "--step", "2")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr[-3000:]
