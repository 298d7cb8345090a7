"""The continual protocol's inputs: the tasks file, each task's records and configs, the mitigations.

A tasks file is JSON, `{"tasks": [task, ...]}`, two tasks or more, each
  {"name": "circles",                       a folder name: letters, digits, _ . -
   "filter": {"shape": "circle"},           optional: records of the demo scenes (below)
   "data": {"name": "karpathy", ...},       optional: config.data overrides (another dataset)
   "steps": 200}                            optional: train.num_steps of this task
A filter keeps the demo scenes whose FIRST object (as the description names it: left to right or
top to bottom) has every attribute given (`shape`: one of `scenes.SHAPES`, `colour`: one of
`scenes.COLOURS`): one first object a scene, so tasks filtering on one attribute are disjoint. It
selects from the training split and `config.eval.split`; selecting nothing in either is an error.
Everything here is checked before any data is built or model compiled, except what needs the
records (`select`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Sequence

import ml_collections

from vlretrieval import config as config_lib
from vlretrieval.data.builders.scenes import COLOURS, SHAPES
from vlretrieval.errors import UserError

TASK_KEYS = ("name", "filter", "data", "steps")
FILTER_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS)}
# The image tower, per config.model.kind, as one `optimizer.freeze` pattern: every parameter the
# image embedding (`encode_image`) reads, and the image-side heads (hashing, topics). The decomposed
# model's image tower is the joint transformer's shared encoder run on patches, so freezing it
# leaves the text tower only its embeddings and projection.
IMAGE_TOWER = {
    "decomposed": r"joint/(encoder|image_embeddings|modality)/.*|image_(projection|pooler|pooling_head|hash|topics)/.*",
    "dual": r"image_encoder/.*|image_(projection|pooler|pooling_head|hash|topics)/.*",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class Task:
    number: int  # 1-based, its place in the sequence
    name: str
    filter: dict[str, str]
    config: ml_collections.ConfigDict  # the experiment's, with the task's data and steps

    @property
    def folder(self) -> str:
        return f"task_{self.number}_{self.name}"


def _task_config(config: ml_collections.ConfigDict, entry: dict, where: str) -> ml_collections.ConfigDict:
    task_config = copy.deepcopy(config)
    data = entry.get("data", {})
    if not isinstance(data, dict):
        raise UserError(f"{where}: \"data\" must be an object of config.data keys, not {data!r}")
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            config_lib.apply_override(task_config, f"data.{key}", text)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
    if "steps" in entry:
        steps = entry["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserError(f"{where}: \"steps\" must be an integer, 1 or more, not {steps!r}")
        task_config.train.num_steps = steps
    from vlretrieval.config_checks import check_config  # not at the top: config_checks imports this module

    try:
        check_config(task_config)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    return task_config


def _filter(entry: dict, where: str) -> dict[str, str]:
    found = entry.get("filter", {})
    if not isinstance(found, dict):
        raise UserError(f"{where}: \"filter\" must be an object such as {{\"shape\": \"circle\"}}, not {found!r}")
    for key, value in found.items():
        if key not in FILTER_VALUES:
            raise UserError(f"{where}: unknown filter key {key!r}; a filter selects by the first object's "
                            f"{' or '.join(FILTER_VALUES)}")
        if value not in FILTER_VALUES[key]:
            raise UserError(f"{where}: filter {key} {value!r} is none of {', '.join(FILTER_VALUES[key])}")
    return dict(found)


def read_tasks(path: str, config: ml_collections.ConfigDict) -> list[Task]:
    """The tasks of the file at `path` with their configs, every entry checked (one line each)."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as error:
        raise UserError(f"--tasks {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--tasks {path} is not JSON ({error})") from None
    entries = document.get("tasks") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UserError(f'--tasks {path} must be a JSON object {{"tasks": [...]}} (docs/continual.md)')
    if len(entries) < 2:
        raise UserError(f"--tasks {path} has {len(entries)} task(s); measuring forgetting needs 2 or more")
    tasks, names = [], set()
    for number, entry in enumerate(entries, start=1):
        where = f"--tasks {path}: task {number}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be an object with a \"name\", not {entry!r}")
        if unknown := sorted(set(entry) - set(TASK_KEYS)):
            raise UserError(f"{where}: unknown key {unknown[0]!r}; a task has {', '.join(TASK_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(f"{where}: \"name\" must be a folder name (letters, digits, _ . -), not {name!r}")
        if name in names:
            raise UserError(f"{where}: the name {name!r} is used twice")
        names.add(name)
        where = f"--tasks {path}: task {number} ({name})"
        tasks.append(Task(number, name, _filter(entry, where), _task_config(config, entry, where)))
    return tasks


def first_object(description: str) -> tuple[str, str, str]:
    """(size, colour, shape) of the first object a scene description names (`scenes.description`:
    "left-to-right: large red circle, small blue square")."""
    size, colour, shape = description.split(": ", 1)[-1].split(", ")[0].split(" ")
    return size, colour, shape


def matches(description: str, task_filter: dict[str, str]) -> bool:
    """Whether the scene's first object has every attribute of the filter."""
    _, colour, shape = first_object(description)
    return all({"shape": shape, "colour": colour}[key] == value for key, value in task_filter.items())


def select(source: Sequence, task: Task, split: str) -> list[int]:
    """Positions of the records of `source` (one split) that the task's filter keeps."""
    where = f"task {task.number} ({task.name})"
    if len(source) and "description" not in source[0]:
        raise UserError(f"{where}: its filter reads the demo scenes' descriptions, which the records of "
                        f"{task.config.data.name!r} do not have; give the task its own data (\"data\") instead")
    selected = []
    for position in range(len(source)):
        description = source[position]["description"]
        if matches(description.decode() if isinstance(description, bytes) else description, task.filter):
            selected.append(position)
    if not selected:
        raise UserError(f"{where}: the filter {json.dumps(task.filter)} selects no record of the {split!r} split")
    return selected


def evaluation_config(task: Task, subset_file: str) -> ml_collections.ConfigDict:
    """The task's config reading its records (`subset_file`, "" for every record)."""
    task_config = copy.deepcopy(task.config)
    task_config.data.subset = subset_file
    return task_config


def training_config(task: Task, subset_file: str, previous_folder: str | None) -> ml_collections.ConfigDict:
    """The task's training config: after the first, starting from the previous task's parameters
    (fresh optimizer) with `config.continual.mitigation` applied."""
    task_config = evaluation_config(task, subset_file)
    if previous_folder is None:
        return task_config  # the experiment's own initialisation (train.init_from or random)
    task_config.train.init_from = previous_folder
    mitigation = task_config.continual.mitigation
    if mitigation == "frozen_image_tower":
        task_config.optimizer.freeze = (*task_config.optimizer.freeze, IMAGE_TOWER[task_config.model.kind])
    elif mitigation == "lwf":
        task_config.distill.teacher = previous_folder
        task_config.objectives.distillation = float(task_config.continual.distillation_weight)
    return task_config
