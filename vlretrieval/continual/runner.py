"""Runs the continual protocol: train the tasks in order, index each task's test gallery when it is
learnt, and after every task score every task's gallery under both indexing policies.

Task t trains in WORKDIR/task_<t>_<name>/, an ordinary run folder (checkpoints, metrics, its
records in subset.json, its gallery in index.safetensors, how to evaluate it in task.json), with
the one trainer (`train.train`); task t > 1 starts from task t-1's final parameters with a fresh
optimizer (`train.init_from`). A folder that already holds its last checkpoint is resumed, not
retrained, so a stopped sequence continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vlretrieval import parallel, train
from vlretrieval.continual import protocol, results
from vlretrieval.data import datasets, pipeline, subsets
from vlretrieval.errors import UserError
from vlretrieval.evaluation import checkpoints, evaluate
from vlretrieval.evaluation import index as index_file
from vlretrieval.evaluation.metrics import average_over_languages, bidirectional_metrics
from vlretrieval.files import check_writable, replaced_atomically
from vlretrieval.models import build_model, image_shape

log = logging.getLogger(__name__)

INDEX_NAME = "index.safetensors"


class _Task:
    """A task ready to train and score: its records, config, data and loaded test gallery."""

    def __init__(self, task: protocol.Task, workdir: str, subset: dict[str, list[int]]):
        self.task, self.folder = task, os.path.join(workdir, task.folder)
        self.subset, self.subset_file = subset, os.path.join(self.folder, "subset.json") if subset else ""
        self.config = protocol.evaluation_config(task, self.subset_file)
        self.data = self.split = None
        self.item_ids: list[str] = []

    @property
    def index_path(self) -> str:
        return os.path.join(self.folder, INDEX_NAME)

    def load(self) -> None:
        """Open the data through `config.data.subset` (as training will) and load the gallery."""
        self.data = datasets.open_dataset(self.config.data, seed=self.config.seed, training=False)
        self.split = checkpoints.evaluation_split(self.config, self.data)
        source = self.data.split(self.config.eval.split)
        ids = [source[position].get("image_id", position) for position in range(len(self.split["images"]))]
        self.item_ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in ids]


def _checked_tasks(tasks: list[protocol.Task], workdir: str) -> list[_Task]:
    """Every task's records selected and checked (none empty, one tokenizer and image input for
    all) before anything is written."""
    prepared, tokenizer = [], None
    for task in tasks:
        where = f"task {task.number} ({task.name})"
        data = datasets.open_dataset(task.config.data, seed=task.config.seed)
        subset = {split: protocol.select(data.split(split), task, split)
                  for split in ("train", task.config.eval.split)} if task.filter else {}
        if tokenizer is None:
            tokenizer = data.tokenizer.tokenizer.to_str()
        elif data.tokenizer.tokenizer.to_str() != tokenizer:
            raise UserError(f"{where}: its data has another tokenizer than task 1's; one model reads every task, "
                            "so give the tasks one tokenizer (config.data.tokenizer)")
        model = build_model(task.config.model, data.tokenizer.vocab_size)
        datasets.check_image_input(data, task.config.eval.split, image_shape(model), model.image_input)
        prepared.append(_Task(task, workdir, subset))
    return prepared


def _overrides(base: ml_collections.ConfigDict, task_config: ml_collections.ConfigDict) -> list[str]:
    """`--config.KEY=VALUE` for every setting where the task's config differs from the experiment's."""
    flat = lambda config: traverse_util.flatten_dict(json.loads(json.dumps(config.to_dict())), sep=".")
    before, after = flat(base), flat(task_config)
    text = lambda value: value if isinstance(value, str) else json.dumps(value)
    return [f"--config.{key}={text(value)}" for key, value in sorted(after.items()) if before.get(key) != value]


def _write_json(path: str, value: Any) -> None:
    with replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)


class _Encoders:
    """The towers' encoders, jitted once for the whole sequence (every task trains the same model,
    so only the parameters change): `for_params(params)` gives (images ->, (ids, mask) ->)."""

    def __init__(self, model):
        self.model = model
        self.image = jax.jit(lambda p, images: model.apply({"params": p}, images, method=model.encode_image))
        self.text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=model.encode_text))

    def for_params(self, params):
        return (lambda images: self.image(params, images)), (lambda ids, mask: self.text(params, ids, mask))


def _embed_gallery(encode_image, entry: _Task, mesh) -> np.ndarray:
    images = pipeline.NormalizedImages(entry.split["images"])
    return evaluate.embed_in_batches(encode_image, [images], entry.config.eval.batch_size, mesh)


def _scores(encode_text, galleries: dict[str, np.ndarray], entry: _Task, mesh) -> dict[str, dict[str, float]]:
    """policy -> metric -> value on the task's test gallery: its captions embedded once (the
    current text tower), ranked against each policy's gallery, averaged over languages."""
    config, options = entry.config, checkpoints.towers_options(entry.config)
    recall_at = tuple(config.eval.recall_at)
    per_language: dict[str, dict[str, Any]] = {policy: {} for policy in galleries}
    for language, captions_per_image in entry.split["captions"].items():
        texts = [caption for captions in captions_per_image for caption in captions]
        if not texts:
            continue
        owners = np.repeat(np.arange(len(captions_per_image)), [len(c) for c in captions_per_image])
        token_ids, text_mask = entry.data.tokenizer.encode(texts, config.data.max_text_length)
        text_embeddings = evaluate.embed_in_batches(encode_text, [token_ids, text_mask], config.eval.batch_size, mesh)
        for policy, gallery in galleries.items():
            per_language[policy][language] = bidirectional_metrics(
                gallery, text_embeddings, owners, recall_at, ("recall", "mean_recall"), options["ties"],
                **options["search_options"])
    return {policy: results.flat_metrics(average_over_languages(scores), recall_at)
            for policy, scores in per_language.items()}


def _describe(row: list[dict[str, dict[str, float] | None]], t: int) -> str:
    parts = []
    for policy in results.POLICIES:
        cells = [results.cell(None if s.get(policy) is None else s[policy]["mean_recall"], j <= t)
                 for j, s in enumerate(row)]
        parts.append(f"{policy} [{', '.join(cells)}]")
    return "; ".join(parts)


def run_continual(config: ml_collections.ConfigDict, workdir: str, tasks: list[protocol.Task], *,
                  progress: bool = True) -> dict[str, Any]:
    """Train and score the task sequence; writes continual.json (after every task), continual.md
    and continual.png in `workdir`, and returns the summary (continual.json's content)."""
    check_writable(workdir, "workdir", directory=True)
    entries = _checked_tasks(tasks, workdir)
    writer = jax.process_index() == 0
    for entry in entries:  # every check passed: now the folders and their subsets
        if entry.subset and writer:
            subsets.write_subset(entry.subset_file, entry.subset)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("continual subsets written")
    for entry in entries:
        entry.load()
    mesh = parallel.make_mesh(config.train.num_devices or None)
    scores = results.Scores(len(entries), results.metric_names(config.eval.recall_at))
    names, folders = [entry.task.name for entry in entries], {}
    mitigation = config.continual.mitigation
    summary: dict[str, Any] = {}
    encoders = None
    for t, entry in enumerate(entries):
        previous = entries[t - 1].folder if t else None
        train_config = protocol.training_config(entry.task, entry.subset_file, previous)
        overrides = _overrides(config, train_config)
        folders[entry.folder] = [shlex.quote(override) for override in overrides]
        log.info(f"task {t + 1}/{len(entries)} ({entry.task.name}): {train_config.train.num_steps} steps"
                 + (f" from {previous} ({mitigation})" if previous else ""))
        model, params, _ = train.train(train_config, entry.folder, progress=progress)
        if writer:
            _write_json(os.path.join(entry.folder, "task.json"), {
                "number": entry.task.number, "name": entry.task.name, "filter": entry.task.filter,
                "mitigation": mitigation if previous else "none (the first task)", "trained_from": previous,
                "overrides": overrides})
        encoders = encoders or _Encoders(model)
        encode_image, encode_text = encoders.for_params(parallel.replicate(params, mesh))
        row = []
        for j, other in enumerate(entries):
            gallery = _embed_gallery(encode_image, other, mesh)
            if j == t and writer:  # the gallery as learnt now: what `keep` queries from here on
                index_file.write_index(entry.index_path, gallery, other.item_ids,
                                       step=train_config.train.num_steps,
                                       config_hash=index_file.config_hash(train_config.model))
            if j == t and jax.process_count() > 1:
                multihost_utils.sync_global_devices("continual index written")
            galleries = {"reindex": gallery}
            if j <= t:
                saved = index_file.read_index(other.index_path)
                galleries["keep"] = index_file.gallery_for_split(saved, other.index_path, len(gallery))
            row.append(_scores(encode_text, galleries, other, mesh))
        scores.add_row(row)
        log.info(f"after task {t + 1} ({entry.task.name}), mean recall: {_describe(row, t)}")
        summary = scores.summary(names, mitigation=mitigation, task_folders=folders,
                                 indexes=[done.index_path for done in entries[: t + 1]])
        if writer:
            results.write_outputs(workdir, summary, complete=t == len(entries) - 1)
    return summary
