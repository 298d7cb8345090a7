"""`vlretrieval benchmark --workdir RUN --suite FILE`: one checkpoint over a suite of datasets and
tasks, CLIP_benchmark style, in one command.

A suite file is JSON: {"tasks": [TASK, ...]}, each TASK
  {"name": "coco", "task": "retrieval", "split": "test", "languages": ["en"],
   "dataset": {<config.data keys: name, manual_dir, images_dir, annotation, dataset_dir, ...>}}
  {"name": "shapes", "task": "zero_shot_classification", "split": "test",
   "dataset": {"layout": "image_folder", "root": "/data/shapes", "classes": ["red square", ...]},
   "templates": "configs/zero_shot/imagenet_templates.json"}
  (zero-shot datasets: "layout": "image_folder" with "root" and optional "classes", or "tfds" with
  "name" and "data_dir": a locally prepared tfds image-classification dataset).
A task may name a "group" ("scene", "object", ...): the report then has a table per group with
the group's mean (configs/suites/scene_object.json: the scene- vs object-centric comparison).

The whole file is checked before any model work: an unknown task, key or layout, a duplicate
name, a missing templates file, or a class list that does not match its image folder is one
`error:` line. Data that is not there (a folder, a prepared dataset) is not an error: that task is
reported as skipped with the reason and the others still run. Each dataset's images are embedded
once (per dataset and split) and reused by every language and task over it. Results are written by
`suite_report.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from vlretrieval import parallel
from vlretrieval.data import datasets, pipeline
from vlretrieval.errors import UserError
from vlretrieval.evaluation import evaluate
from vlretrieval.evaluation.checkpoints import towers_options

log = logging.getLogger(__name__)

TASKS = ("retrieval", "zero_shot_classification")
TASK_KEYS = {"name", "task", "split", "languages", "dataset", "templates", "group"}
ZERO_SHOT_LAYOUTS = {"image_folder": {"layout", "root", "classes"}, "tfds": {"layout", "name", "data_dir"}}


@dataclasses.dataclass
class Task:
    name: str
    task: str
    split: str
    dataset: dict[str, Any]
    languages: tuple[str, ...] = ()
    templates: Any = None  # zero_shot.PromptTemplates
    group: str = ""  # e.g. "scene" or "object": the report tabulates each group apart

    def dataset_key(self) -> str:
        """Tasks over the same dataset and split share one embedding of its images."""
        return json.dumps([self.task == "retrieval", self.dataset, self.split], sort_keys=True)


def _fail(where: str, problem: str):
    raise UserError(f"suite {where}: {problem}")


def read_suite(path: str, data_config: ml_collections.ConfigDict) -> list[Task]:
    """The suite's tasks, every one checked (see the module docstring); `data_config` is the
    run's data section, whose keys a retrieval dataset may set."""
    if not os.path.isfile(path):
        raise UserError(f"suite file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            suite = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"suite file {path} is not JSON: {error}") from None
    if not isinstance(suite, dict) or set(suite) != {"tasks"} or not isinstance(suite["tasks"], list) or not (
        suite["tasks"]
    ):
        raise UserError(f'suite file {path} must be {{"tasks": [...]}} with at least one task')
    tasks, names = [], set()
    for number, entry in enumerate(suite["tasks"], 1):
        where = f"{path} task {number}"
        if not isinstance(entry, dict):
            _fail(where, "is not an object")
        where = f"{path} task {number} ({entry.get('name', 'unnamed')})"
        unknown = sorted(set(entry) - TASK_KEYS)
        if unknown:
            _fail(where, f"unknown key {unknown[0]!r}; a task has {sorted(TASK_KEYS)}")
        for key in ("name", "task", "split", "dataset"):
            if key not in entry:
                _fail(where, f"has no {key!r}")
        if entry["task"] not in TASKS:
            _fail(where, f"unknown task {entry['task']!r}; choose one of {TASKS}")
        if entry["name"] in names:
            _fail(where, f"the name {entry['name']!r} is used twice")
        names.add(entry["name"])
        if not isinstance(entry["dataset"], dict):
            _fail(where, "'dataset' must be an object")
        group = entry.get("group", "")
        if not isinstance(group, str):
            _fail(where, "'group' must be a string (e.g. \"scene\" or \"object\")")
        task = Task(entry["name"], entry["task"], str(entry["split"]), dict(entry["dataset"]), group=group)
        if task.task == "retrieval":
            _check_retrieval(task, entry, data_config, where)
        else:
            _check_zero_shot(task, entry, where)
        tasks.append(task)
    return tasks


def _check_retrieval(task: Task, entry: dict, data_config, where: str) -> None:
    unknown = sorted(set(task.dataset) - set(data_config.keys()))
    if unknown:
        _fail(where, f"unknown dataset key {unknown[0]!r}: a retrieval dataset takes config.data keys")
    if "templates" in entry:
        _fail(where, "'templates' is for zero_shot_classification tasks")
    languages = entry.get("languages", list(data_config.languages))
    if not isinstance(languages, list) or not languages or not all(isinstance(x, str) and x for x in languages):
        _fail(where, "'languages' must be a non-empty list of language codes")
    task.languages = tuple(languages)


def _check_zero_shot(task: Task, entry: dict, where: str) -> None:
    from vlretrieval.evaluation import zero_shot

    layout = task.dataset.get("layout")
    if layout not in ZERO_SHOT_LAYOUTS:
        _fail(where, f"dataset layout {layout!r} is not one of {sorted(ZERO_SHOT_LAYOUTS)}")
    unknown = sorted(set(task.dataset) - ZERO_SHOT_LAYOUTS[layout])
    if unknown:
        _fail(where, f"unknown {layout} dataset key {unknown[0]!r}; it takes {sorted(ZERO_SHOT_LAYOUTS[layout])}")
    if "languages" in entry:
        _fail(where, "'languages' is for retrieval tasks (prompts are in the templates' language)")
    if "templates" not in entry:
        _fail(where, "has no 'templates' (a JSON file of prompt templates)")
    try:
        task.templates = zero_shot.load_templates(entry["templates"])
    except (UserError, OSError) as error:
        _fail(where, str(error))
    if layout == "image_folder":
        _check_class_folders(task, where)


def _check_class_folders(task: Task, where: str) -> None:
    """A class list that does not match the folders is bad input (checked now); a folder that is
    not there is missing data (the task is skipped when it runs)."""
    from vlretrieval.data import image_folder

    split_dir = os.path.join(task.dataset.get("root", ""), task.split)
    classes = task.dataset.get("classes")
    if not os.path.isdir(split_dir) or classes is None:
        return
    folders = [entry.name for entry in os.scandir(split_dir) if entry.is_dir()]
    try:
        image_folder.resolve_class_names(folders, classes, split_dir)
    except (UserError, OSError) as error:
        _fail(where, str(error))


class _Embedder:
    """Image embeddings per dataset, computed once; counts the passes (a test checks them)."""

    def __init__(self, model, params, mesh, batch_size: int):
        self.encode_image, self.encode_text = evaluate.encoders(model, parallel.replicate(params, mesh))
        self.mesh, self.batch_size = mesh, batch_size
        self.cache: dict[str, np.ndarray] = {}
        self.passes: dict[str, int] = {}

    def images(self, key: str, images) -> np.ndarray:
        if key not in self.cache:
            self.cache[key] = evaluate.embed_in_batches(
                self.encode_image, [pipeline.NormalizedImages(images)], self.batch_size, self.mesh
            )
            self.passes[key] = self.passes.get(key, 0) + 1
        return self.cache[key]


def _retrieval(task: Task, config, model, params, tokenizer, embedder: _Embedder, mesh) -> list[dict]:
    data_config = copy.deepcopy(config.data)
    with data_config.unlocked():
        data_config.update(task.dataset)
        data_config.languages = task.languages
    data = datasets.open_dataset(data_config, seed=config.seed, training=False)
    split = pipeline.load_split(
        data.split(task.split), task.languages, config.model.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    if data.categories is not None:  # label metrics (config.eval.metrics) read them
        split["labels"] = data.labels(task.split, f"suite task {task.name}")[: len(split["images"])]
        split["categories"] = data.categories
    image_embeddings = embedder.images(task.dataset_key(), split["images"])
    results = evaluate.evaluate_split(
        model, params, split, tokenizer, mesh=mesh, image_embeddings=image_embeddings, **towers_options(config)
    )
    return [{"language": language, "metrics": values, "num_images": results["num_images"]}
            for language, values in results["languages"].items()]


def _zero_shot(task: Task, config, model, params, tokenizer, embedder: _Embedder, mesh) -> list[dict]:
    from vlretrieval.data import image_folder
    from vlretrieval.evaluation import zero_shot

    share = dict(process_index=jax.process_index(), process_count=jax.process_count())
    spec = task.dataset
    if spec["layout"] == "image_folder":
        dataset = image_folder.load_image_folder(spec.get("root", ""), task.split, config.model.image_size,
                                                 class_names=spec.get("classes"), **share)
    else:
        dataset = image_folder.load_tfds_classification(spec.get("name", ""), spec.get("data_dir"), task.split,
                                                        config.model.image_size, **share)
    image_embeddings = embedder.images(task.dataset_key(), dataset.images)
    found = zero_shot.evaluate_zero_shot(
        model, params, dataset, tokenizer, task.templates, mesh=mesh, batch_size=config.eval.batch_size,
        max_text_length=config.data.max_text_length, image_embeddings=image_embeddings,
    )
    return [{"language": None, "metrics": found, "num_images": int(found["num_images"])}]


def run_suite(config: ml_collections.ConfigDict, tasks: list[Task], model, params, tokenizer) -> dict[str, Any]:
    """Every task's results (or the reason it was skipped), and the image passes per dataset."""
    mesh = parallel.make_mesh(config.train.num_devices or None)
    embedder = _Embedder(model, params, mesh, config.eval.batch_size)
    outcomes = []
    for task in tasks:
        try:
            if task.task == "retrieval":
                rows = _retrieval(task, config, model, params, tokenizer, embedder, mesh)
            else:
                rows = _zero_shot(task, config, model, params, tokenizer, embedder, mesh)
        except UserError as missing:  # the data is not there: say why, go on with the rest
            log.warning(f"suite task {task.name}: skipped: {missing}")
            outcomes.append({"name": task.name, "task": task.task, "split": task.split, "group": task.group,
                             "skipped": str(missing)})
            continue
        for row in rows:
            outcomes.append({"name": task.name, "task": task.task, "split": task.split, "group": task.group, **row})
    return {"results": outcomes, "image_passes": dict(embedder.passes)}
