"""One trainer for every objective: train state, jitted sharded step, and the loop.

`train_and_evaluate(config, workdir)` is the whole run; a test can call it with a tiny config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import optax
from tqdm import tqdm

from vlretrieval import config as config_lib
from vlretrieval import distillation, objectives, parallel, preemption, throughput, topics
from vlretrieval.accumulate import accumulated_value_and_grad
from vlretrieval.checkpoint import Checkpointer, has_checkpoint
from vlretrieval.collapse import CollapseWatch
from vlretrieval.config_checks import check_config
from vlretrieval.convert.initialise import initial_params
from vlretrieval.data import datasets, pipeline, shards, streaming
from vlretrieval.data.builders.image_captions import summary
from vlretrieval.errors import UserError
from vlretrieval.evaluation import checkpoints
from vlretrieval.evaluation.report import format_table
from vlretrieval.files import check_writable
from vlretrieval.models import build_model
from vlretrieval.models.factory import image_shape, parameter_count
from vlretrieval.negatives import TextNegativeComposer
from vlretrieval.objectives import label_terms
from vlretrieval.run_log import MetricsWriter, batch_record
from vlretrieval.state import TrainState, check_fine_tuning, create_train_state, make_optimizer

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def make_train_step(objective, tx, schedule, *, accumulation_steps: int = 1, mesh=None):
    """A pure `(state, batch) -> (state, metrics)` step; `jit` shards it over the mesh.

    `objective` comes from `objectives.make_objective`. With `accumulation_steps` > 1 the batch
    is processed in that many micro-batches with cached embeddings (`accumulate.py`): the same
    loss and gradients as the whole batch at a fraction of the activation memory.
    """

    def gradients(params, batch, rng):
        if accumulation_steps == 1:
            return jax.value_and_grad(objective.loss, has_aux=True)(params, batch, rng)
        tower_rng = objectives.split_loss_rng(rng)[0]
        return accumulated_value_and_grad(
            objective, params, batch, tower_rng, accumulation_steps,
            split=lambda tree: parallel.split_microbatches(tree, accumulation_steps, mesh),
            merge=lambda tree: parallel.merge_microbatches(tree, mesh),
        )

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_rng = jax.random.fold_in(state.rng, state.step)
        (_, metrics), grads = gradients(state.params, batch, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, gradient_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def objective_for(model, config: ml_collections.ConfigDict, data, mesh, student=None, teacher=None):
    """The config's objectives over the mesh, checked against the model (the `student` of a
    teacher-student model, and its `teacher`), data and batch layout."""
    objectives.check_objectives(
        config.objectives, model if student is None else student, data.tokenizer.mask_id,
        data.content_words is not None, teacher=teacher,
    )
    objective = objectives.make_objective(
        model,
        config.objectives,
        patch_size=config.model.patch_size,
        mask_id=data.tokenizer.mask_id,
        vocab_size=data.tokenizer.vocab_size,
        tower_losses=parallel.CrossDeviceLosses(mesh),
    )
    if config.train.accumulation_steps != 1:
        parallel.check_accumulation(config.train.batch_size, mesh, config.train.accumulation_steps)
        if objective.uses_joint_terms:
            raise UserError(
                "config.train.accumulation_steps > 1 supports the tower objectives only "
                "(image_text_matching and masked_language_model need the whole batch's encoders)"
            )
    return objective


def _check_finite(metrics: dict[str, float], step: int) -> None:
    if not math.isfinite(metrics["loss"]):
        raise TrainingDiverged(
            f"loss is {metrics['loss']} at step {step}: training diverged; lower "
            "config.optimizer.learning_rate or check the data (no checkpoint was written for it)"
        )


@dataclasses.dataclass
class _Run:
    """A run's pieces, all built and checked before anything is written."""

    data: Any
    translations: Any
    mesh: Any
    model: Any  # what the step trains: the student, or a TeacherStudent holding it
    tx: Any
    schedule: Any
    state: TrainState
    objective: objectives.Objective
    student: Any  # the model evaluation uses (`model` itself without a teacher)
    teacher: distillation.Teacher | None = None


def _checked_run(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """Every input checked and every piece built, in the order that fails cheapest first."""
    check_config(config)
    check_writable(workdir, "workdir", directory=True)
    build_model(config.model, vocab_size=1)  # a bad model option fails before data is prepared
    data = datasets.open_dataset(config.data, seed=config.seed)  # bad data fails before any write
    data.split(config.eval.split)  # an evaluation split the dataset lacks fails now, not after training
    # Label terms and label metrics on data without category labels fail now, not after training.
    label_terms.check_label_data(config.objectives, data)
    checkpoints.check_label_metrics(config, data)
    if data.shards is not None:  # too few shards for the hosts fails now
        shards.epoch_shards(list(data.shards.paths), config.seed, 0, jax.process_index(), jax.process_count())
    mesh = parallel.make_mesh(config.train.num_devices or None)
    parallel.check_batch_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    student = build_model(config.model, data.tokenizer.vocab_size)
    datasets.check_image_input(data, config.eval.split, image_shape(student), student.image_input)
    teacher = distillation.open_teacher(config, data.tokenizer.vocab_size)  # a teacher that cannot serve fails now
    model = distillation.training_model(config, student, data.tokenizer.vocab_size, teacher)
    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps,
                                  frozen=distillation.FROZEN if teacher else ())
    state = create_train_state(model, tx, config.seed)
    check_fine_tuning(config.optimizer, state.params)  # a freeze pattern that matches nothing
    objective = objective_for(model, config, data, mesh, student=student, teacher=teacher)
    translations = None
    if config.objectives.text_text > 0:
        parallel.check_batch_divisible(config.bitext.batch_size, mesh, "config.bitext.batch_size")
        parallel.check_accumulation(config.bitext.batch_size, mesh, config.train.accumulation_steps)
        translations = datasets.open_translations(config.bitext, config.data, config.seed)
    return _Run(data, translations, mesh, model, tx, schedule, state, objective, student, teacher)


def _starting_state(config: ml_collections.ConfigDict, run: _Run, checkpointer):
    """(step, state) to start from: the latest checkpoint (said in the log), else step 0 and the
    run's state (initialised, or `train.init_from`'s weights: `_initialised_from`)."""
    state = run.state
    if checkpointer.all_steps():
        step, state = checkpointer.restore_latest(state)
        log.info(f"resuming from the checkpoint at step {step} in {checkpointer.directory}")
        # Extending num_steps is routine; a changed learning rate or objective should show in the log.
        saved = checkpointer.saved_config(step)
        if saved is not None and (changed := config_lib.differences(saved, config)):
            log.info(f"note: the config differs from the one saved at step {step}: " + "; ".join(changed))
        return step, state
    return 0, state


def _initialised_from(config: ml_collections.ConfigDict, workdir: str, run: _Run) -> TrainState:
    """A new run starting from another run's weights (e.g. the towers from a pre-trained joint
    model): parameters only; the optimizer, step and data order start afresh. With a teacher
    (config.distill) `init_from` initialises the student, and the teacher's own weights go into
    params["teacher"]. A resumed run ignores both: its own checkpoint is newer."""
    if has_checkpoint(workdir) or not (config.train.init_from or run.teacher):
        return run.state
    params = run.state.params
    if config.train.init_from:  # the student's parameters
        if run.teacher is None:
            params = initial_params(config.train.init_from, params, config.model)
        else:
            params = {**params, "student": initial_params(config.train.init_from, params["student"], config.model)}
        log.info(f"initialised the parameters from {config.train.init_from}")
    if run.teacher is not None:  # the frozen teacher's own weights
        params = distillation.with_teacher_params(params, run.teacher)
        log.info(f"distilling from {run.teacher.description} at {run.teacher.path} (frozen)")
    return run.state.replace(params=params, opt_state=run.tx.init(params))


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True):
    """Train to `config.train.num_steps`, resuming from the latest checkpoint in `workdir`.

    Returns (model, params, data) for evaluation: with a teacher, the student's.
    """
    run = _checked_run(config, workdir)
    run.state = _initialised_from(config, workdir, run)
    os.makedirs(workdir, exist_ok=True)  # only now: every input has been checked
    checkpointer = Checkpointer(
        workdir, keep_last=config.train.keep_last, keep_best=config.train.keep_best,
        best_metric=config.train.best_metric,
    )
    start_step, state = _starting_state(config, run, checkpointer)
    mesh = run.mesh
    state_shardings = parallel.state_shardings(state, mesh, config.train.fsdp)
    state = jax.device_put(state, state_shardings)
    log.info(
        f"model: {config.model.kind}, {parameter_count(state.params) / 1e6:.2f}M parameters"
        f"{' (FSDP)' if config.train.fsdp else ''}; {mesh.size} device(s), global batch "
        f"{config.train.batch_size}"
        + (f" in {config.train.accumulation_steps} micro-batches"
           if config.train.accumulation_steps > 1 else "")
    )
    step_fn = jax.jit(
        make_train_step(
            run.objective, run.tx, run.schedule, accumulation_steps=config.train.accumulation_steps,
            mesh=mesh,
        ),
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    batches = _training_batches(config, run.data, run.translations, workdir)
    if start_step:
        # Checkpoints written before the pipeline state was saved: batch = step, so the step is
        # the position.
        saved = checkpointer.restore_data_state(start_step)
        batches.set_state(saved or {name: {"next_index": start_step} for name in batches.iterators})
    try:
        state = _loop(config, workdir, run, step_fn, state, batches, checkpointer, start_step, progress)
    finally:  # whatever stops the run (the end, a signal, a diverged loss), no save is cut short
        batches.close()
        checkpointer.wait()
        checkpointer.close()
    return run.student, _student_params(run, state.params), run.data


def _student_params(run: _Run, params):
    return params if run.teacher is None else params["student"]


def _loop(config, workdir, run: _Run, step_fn, state, batches, checkpointer, start_step, progress):
    """Steps `start_step + 1 ... num_steps`: log, evaluate, checkpoint, stop on SIGTERM."""
    writer = MetricsWriter(workdir)
    writer.keep_until(start_step)
    recorder = None
    if config.train.record_batches:  # which samples each step trained on, per host
        recorder = MetricsWriter(workdir, f"batches.process_{jax.process_index()}.jsonl", every_process=True)
        recorder.keep_until(start_step)
    num_steps, check_every, data = config.train.num_steps, config.train.preemption_check_every, run.data
    examples = data.training_examples()  # None: unindexed shards, no epoch lines
    epoch_steps = pipeline.steps_per_epoch(examples, config.train.batch_size) if examples else 0
    bar = tqdm(
        total=num_steps, initial=start_step, unit="step", disable=not progress or start_step >= num_steps
    )
    meter, collapse_watch = None, CollapseWatch(config)
    with preemption.StopSignalGuard() as stop_signal:
        for step in range(start_step + 1, num_steps + 1):
            host_batch = next(batches)
            if recorder is not None:
                recorder.write(batch_record(step, host_batch))
            batch = parallel.global_batch(pipeline.device_fields(host_batch), run.mesh)
            if meter is None:
                step_fn, meter = _compile_step(step_fn, state, batch, config, start_step)
            state, metrics = step_fn(state, batch)
            is_last = step == num_steps
            # Every N steps, not every step: on several hosts the check is a collective, and one
            # per step would stall asynchronous dispatch. All hosts check at the same steps.
            preempted = step % check_every == 0 and stop_signal.requested()
            saving = step % config.train.checkpoint_every == 0 or is_last or preempted
            if step % config.train.log_every == 0 or saving:
                metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
                _check_finite(metrics, step)
                if warning := collapse_watch.observe(step, metrics):
                    log.warning(warning)
                metrics.update(meter.mark(step))
                writer.write({"step": step, **metrics})
                # Advanced only here, where the device has finished the steps: per dispatched step
                # the bar raced ahead of the device and then stalled at every log step.
                bar.update(step - bar.n)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", ex_per_s=f"{metrics['examples_per_second']:.0f}"
                )
            eval_metrics = None
            if config.train.eval_every and (step % config.train.eval_every == 0 or is_last):
                eval_metrics = checkpoints.evaluate_during_training(
                    config, run.student, _student_params(run, state.params), data, run.mesh
                )
                writer.write({"step": step, **{f"eval_{k}": v for k, v in eval_metrics.items()}})
                meter.restart(step)
                saving = True  # the metric ranks checkpoints: keep one at every evaluation
            if saving:
                checkpointer.save(step, state, config, batches.get_state(), eval_metrics)
                preemption.fault_point_after_save_started(step)
            if epoch_steps and step % epoch_steps == 0 and (skipped := _skipped_records(data, batches)):
                log.info(f"epoch {step // epoch_steps} done: {skipped}")
            if preempted:
                bar.close()
                raise preemption.Preempted(step, checkpointer.directory, stop_signal.signum)
    bar.close()
    return state


def _compile_step(step_fn, state, batch, config, start_step: int):
    """The step compiled ahead of time for these shapes (its FLOPs are read off the compiled
    program, once), and the meter that turns step times into TFLOP/s and MFU."""
    started = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    flops = throughput.compiled_flops(compiled)
    device_kind = jax.devices()[0].device_kind
    peak = throughput.peak_tflops(device_kind, config.model.dtype, config.train.peak_tflops)
    log.info(f"compiled the train step in {time.perf_counter() - started:.1f} s; "
             + throughput.describe(flops, peak, device_kind, config.model.dtype))
    return compiled, throughput.StepMeter(start_step, config.train.batch_size, flops, peak)


def _skipped_records(data, batches) -> str | None:
    """What the training data skipped: while streaming shards so far, or when it was prepared."""
    if data.shards is not None:
        return "streaming " + summary(batches.iterators["image_text"].tally.to_json())
    return None if data.bad_records is None else f"preparation {summary(data.bad_records)}"


def _image_text_batches(config: ml_collections.ConfigDict, data, workdir: str):
    """This host's image-text batches: streamed from webdataset shards, or a prepared split's."""
    options = pipeline.BatchOptions(
        local_batch_size=parallel.local_batch_size(config.train.batch_size),
        languages=tuple(config.data.languages), max_text_length=config.data.max_text_length, seed=config.seed,
        image_size=config.model.image_size, crop_scale=tuple(config.data.crop_scale),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    if data.shards is not None:
        return streaming.StreamBatches(
            data.shards, data.tokenizer, options, shuffle_buffer=config.data.shuffle_buffer,
            readers=config.data.shard_readers, workers=config.data.workers, on_bad_record=config.data.on_bad_record,
        )
    text_negatives = None
    if config.objectives.composed_text_negatives:
        text_negatives = TextNegativeComposer(data.content_words, config.objectives.text_swap_fraction)
    return pipeline.training_dataset(data.split("train"), data.tokenizer, options, text_negatives,
                                     record_fields(config, data, workdir))


def record_fields(config: ml_collections.ConfigDict, data, workdir: str) -> dict[str, Any]:
    """Per-record arrays the training batches carry beside the pixels and tokens: the category
    labels of labelled data (label-supervised terms read `batch["labels"]`), and with
    `objectives.topic_prediction` the LDA topic distribution of each record's texts (the run's
    topic model, fitted into `workdir` or reused from it: `topics.py`)."""
    fields = {}
    if data.categories is not None:
        fields["labels"] = data.labels("train", "training")
    if config.objectives.get("topic_prediction", 0) > 0:
        fields["topic_targets"] = topics.training_targets(config, data, workdir)
    return fields


def _training_batches(config: ml_collections.ConfigDict, data, translations, workdir: str):
    """This host's batches: image-text pairs, and with the text-text task a batch of translation
    pairs beside them; one state for both (saved in each checkpoint)."""
    image_text = _image_text_batches(config, data, workdir)
    if translations is None:
        return pipeline.TrainingBatches({"image_text": image_text})
    sources, weights = translations
    bitext = pipeline.translation_dataset(
        pipeline.TranslationMixture(sources, weights, seed=config.seed + 2),
        data.tokenizer,
        local_batch_size=parallel.local_batch_size(config.bitext.batch_size),
        max_text_length=config.data.max_text_length,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return pipeline.TrainingBatches({"image_text": image_text, "text_text": bitext})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> dict[str, Any]:
    """Train, then evaluate on `config.eval.split`; writes results.json and prints the table."""
    started = time.perf_counter()
    model, params, data = train(config, workdir, progress=progress)
    results = checkpoints.evaluate_checkpoint(config, workdir, model, params, data, step=config.train.num_steps)
    results["wall_seconds"] = time.perf_counter() - started
    log.info(format_table(results, config.eval.recall_at))
    return results
