"""Evaluating a run: restore its latest checkpoint for evaluation, evaluate it on
`config.eval.split` (towers, joint or rerank; against a saved index or not), and the cheap
evaluation the trainer runs every `train.eval_every` steps to rank checkpoints.

The trainer calls this module; nothing here imports the trainer.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections

from vlretrieval import config as config_lib
from vlretrieval import distillation, parallel, topics
from vlretrieval.checkpoint import Checkpointer, load_params
from vlretrieval.data import datasets, pipeline
from vlretrieval.errors import UserError
from vlretrieval.evaluation import codes, metrics, report
from vlretrieval.evaluation import index as index_file
from vlretrieval.evaluation.evaluate import LATE_INTERACTION_MODES, evaluate_split, write_results
from vlretrieval.evaluation.label_metrics import LABEL_METRICS
from vlretrieval.files import check_writable
from vlretrieval.models import build_model, image_shape
from vlretrieval.state import create_train_state, make_optimizer

log = logging.getLogger(__name__)


def evaluation_split(config: ml_collections.ConfigDict, data) -> dict[str, Any]:
    """`config.eval.split` loaded in the evaluated languages (its first `eval.max_images`), with
    its images' category labels when the dataset has them. In
    towers and late-interaction modes each host decodes only the images it embeds; joint and rerank
    score pairs with any image, so there every host loads them all."""
    per_host = config.eval.mode in ("towers", "topics", *LATE_INTERACTION_MODES)  # images only embedded
    share = (jax.process_index(), jax.process_count()) if per_host else (0, 1)
    split = pipeline.load_split(
        data.split(config.eval.split), config.data.languages, config.model.image_size,
        max_images=config.eval.max_images, process_index=share[0], process_count=share[1],
    )
    if data.categories is not None:  # multi-hot [images, categories]: label-based metrics read them
        split["labels"] = data.labels(config.eval.split, "evaluation")[: len(split["images"])]
        split["categories"] = data.categories
    return split


def check_label_metrics(config: ml_collections.ConfigDict, data) -> None:
    """One line when `config.eval.metrics` asks for label metrics of a dataset without category
    labels (`data.labels` refuses): called before any model work (train, eval)."""
    asked = [name for name in config.eval.metrics if name in LABEL_METRICS]
    if asked:
        data.labels(config.eval.split, f"config.eval.metrics={asked[0]}")


def towers_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`evaluate_split`'s settings from `config.eval`, the same for `eval` and `benchmark`."""
    return dict(
        batch_size=config.eval.batch_size,
        max_text_length=config.data.max_text_length,
        recall_at=config.eval.recall_at,
        metrics=metrics.check_metrics(config.eval.metrics),
        ties=metrics.check_ties(config.eval.ties),
        ndcg_at=tuple(config.eval.ndcg_at),
        aggregation=config.eval.late_interaction_aggregation,
        search_options=dict(query_chunk=config.eval.query_chunk, gallery_chunk=config.eval.gallery_chunk,
                            score_dtype=config.eval.score_dtype),
    )


def restore_for_evaluation(config: ml_collections.ConfigDict, workdir: str, *, scoring: bool = False):
    """(model, params, data, step) of the checkpoint in `workdir` that `config.eval.step` names
    (0: the latest; an unreadable latest one only gives way to an older one with
    `config.eval.fallback`), built from `config`. `scoring` (the metrics will be computed): label
    metrics asked of a dataset without labels are refused before the checkpoint is read.
    Prints `config_lib.evaluated_config_note` where the config's data or model settings differ
    from the checkpoint's."""
    data = datasets.open_dataset(config.data, seed=config.seed, training=False)
    if scoring:
        check_label_metrics(config, data)
    vocab_size = data.tokenizer.vocab_size
    model = build_model(config.model, vocab_size)
    datasets.check_image_input(data, config.eval.split, image_shape(model), model.image_input)
    # A run distilled from a teacher saved the teacher-student model: restored whole, the
    # student evaluated.
    teacher = distillation.open_teacher(config, vocab_size)
    trained = distillation.training_model(config, model, vocab_size, teacher)
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps, frozen=distillation.FROZEN if teacher else ())
    # Read-only: evaluation never renames, cleans up or deletes anything in the run's folder.
    checkpointer = Checkpointer(workdir, read_only=True)
    step, state = checkpointer.restore_latest(
        create_train_state(trained, tx, config.seed), step=config.eval.step or None,
        fallback=config.eval.fallback,
    )
    note = config_lib.evaluated_config_note(checkpointer.saved_config(step), config, step)
    checkpointer.close()
    if note:
        log.info(note)
    return model, state.params if teacher is None else state.params["student"], data, step


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, model=None, params=None, data=None, step=None
) -> dict[str, Any]:
    """Evaluate `params` at `step` (or the checkpoint in `workdir` that `config.eval` names) on
    `config.eval.split`; results.json records the step and the model config's hash."""
    check_writable(workdir, "workdir", directory=True)  # results go there: fail before the work
    text_topics = None
    if config.eval.mode == "topics":  # the captions' topics: the run's own LDA (`topics.py`)
        if config.eval.index:
            raise UserError(f"config.eval.index {config.eval.index} holds tower embeddings: evaluate it in towers mode")
        text_topics = topics.load_for_head(workdir, config.model.head.num_topics).distributions
    if model is None:
        model, params, data, step = restore_for_evaluation(config, workdir, scoring=True)
    joint_params = None
    if config.eval.joint_from and config.eval.mode != "towers":
        joint_params = load_params(config.eval.joint_from, params)
    mesh = parallel.make_mesh(config.train.num_devices or None)
    split = evaluation_split(config, data)
    # A saved image index (`vlretrieval index`) stands in for embedding the images; the query
    # encoder must give vectors of its dimension and normalisation.
    saved_index = index_file.read_index(config.eval.index) if config.eval.index else None
    code_options = {}
    if saved_index is not None and saved_index.is_codes:  # ranked by Hamming distance
        if config.eval.mode != "towers":
            raise UserError(f"config.eval.index {config.eval.index} holds binary codes: evaluate it in towers mode")
        _, text_codes, bits, source = codes.model_code_encoders(model, parallel.replicate(params, mesh))
        index_file.check_code_queries(saved_index, config.eval.index, bits, source)
        # Rank metrics only: mAP, NDCG and the sign-code section score float embeddings.
        kept = [name for name in metrics.check_metrics(config.eval.metrics)
                if name in ("recall", "rank", "mean_recall", "paired_recall")]
        code_options = {"text_codes": text_codes, "metrics": tuple(kept)}
    results = evaluate_split(
        model,
        params,
        split,
        data.tokenizer,
        mesh=mesh,
        mode=config.eval.mode,
        shortlist_size=config.eval.shortlist,
        pair_batch_size=config.eval.pair_batch_size,
        joint_params=joint_params,
        rerank_tower_weight=config.eval.rerank_tower_weight,
        image_embeddings=None if saved_index is None else index_file.gallery_for_split(
            saved_index, config.eval.index, len(split["images"])),
        check_queries=None if saved_index is None or code_options else index_file.query_checker(
            saved_index, config.eval.index),
        text_topics=text_topics,
        **{**towers_options(config), **code_options},
    )
    results["split"] = config.eval.split
    results["step"] = None if step is None else int(step)
    results["config_hash"] = index_file.config_hash(config.model)
    if saved_index is not None:
        results["index"] = {"path": config.eval.index, "step": saved_index.step,
                            "config_hash": saved_index.config_hash}
    if jax.process_index() == 0:
        # Towers results are the run's results.json; other modes do not overwrite them.
        name = "results.json" if config.eval.mode == "towers" else f"results_{config.eval.mode}.json"
        write_results(results, workdir, name)
        if config.eval.report:
            report.write_report(results, workdir, name[: -len(".json")])
    return results


def evaluate_during_training(config, model, params, data, mesh) -> dict[str, float]:
    """Mean recall (average over languages) on `config.eval.split`, to rank checkpoints."""
    split = evaluation_split(config, data)
    results = evaluate_split(
        model, params, split, data.tokenizer, mesh=mesh, batch_size=config.eval.batch_size,
        max_text_length=config.data.max_text_length, recall_at=config.eval.recall_at,
        ties=metrics.check_ties(config.eval.ties),
    )
    return {"mean_recall": results["average"]["mean_recall"]}
