"""The `benchmark` command: check the suite, restore the checkpoint, run every task, write the
report (process 0), return the summary line."""

from __future__ import annotations

import os

import jax
import ml_collections

from vlretrieval.errors import UserError
from vlretrieval.evaluation import index as index_file
from vlretrieval.evaluation import suite, suite_report
from vlretrieval.evaluation.checkpoints import restore_for_evaluation
from vlretrieval.files import check_writable


def benchmark(config: ml_collections.ConfigDict, workdir: str, suite_path: str, output: str | None) -> str:
    if config.eval.mode != "towers":  # a suite scores the towers' embeddings: another mode would be ignored
        raise UserError(f"config.eval.mode is {config.eval.mode!r}, but `benchmark` scores the towers' embeddings "
                        "only: leave it at towers (other modes: `vlretrieval eval`)")
    tasks = suite.read_suite(suite_path, config.data)  # the whole file, before any model work
    output = output or os.path.join(workdir, "benchmark")
    check_writable(output, "--output", directory=True)
    model, params, data, step = restore_for_evaluation(config, workdir)
    outcome = suite.run_suite(config, tasks, model, params, data.tokenizer)
    described = {"workdir": os.path.abspath(workdir), "step": int(step), "kind": config.model.kind,
                 "config_hash": index_file.config_hash(config.model)}
    if jax.process_index() == 0:
        suite_report.write_report(outcome, output, described)
    done = [row for row in outcome["results"] if "skipped" not in row]
    skipped = [row for row in outcome["results"] if "skipped" in row]
    return (f"benchmark of {workdir} (step {step}): {len(done)} results from {len(tasks) - len(skipped)} tasks"
            + (f", {len(skipped)} skipped" if skipped else "") + f"; written to {output} (results.md)")
