"""The continual protocol's results: the score matrices [task trained x task evaluated] of each
indexing policy, average forgetting and average final score, and the files continual.json,
continual.md and continual.png.

Row t holds the scores after training task t, column j those on task j's test gallery. An entry
with j > t is a task not yet trained: `reindex` scores it anyway (forward transfer, marked), `keep`
has no index of it yet (None). Average forgetting after the last row T is the mean over tasks
j < T of max_{j <= t < T} score[t][j] - score[T][j] (only rows after task j was learnt count);
the average final score is the mean of row T over the tasks trained (all of them at the end).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlretrieval.evaluation.metrics import DIRECTIONS
from vlretrieval.evaluation.report import pyplot, save_figure
from vlretrieval.files import replaced_atomically

POLICIES = {
    "reindex": "every gallery re-embedded with the current image tower",
    "keep": "each gallery's index as saved when its task was learnt, queried with the current text tower",
}
ARROWS = {"text_to_image": "T→I", "image_to_text": "I→T"}
Matrix = list[list[float | None]]


def metric_names(recall_at: Sequence[int]) -> list[str]:
    """"mean_recall" and "<direction>/R@K" for every K, both ways: the matrices kept."""
    return ["mean_recall", *(f"{direction}/R@{k}" for direction in DIRECTIONS for k in recall_at)]


def flat_metrics(averaged: dict[str, Any], recall_at: Sequence[int]) -> dict[str, float]:
    """The `metric_names` values of `bidirectional_metrics` results (averaged over languages)."""
    values = {"mean_recall": float(averaged["mean_recall"])}
    values.update({f"{d}/R@{k}": float(averaged[d][f"R@{k}"]) for d in DIRECTIONS for k in recall_at})
    return values


def average_forgetting(rows: Matrix) -> float | None:
    """Mean over tasks j < T of (best score on j after learning it, before the last row) minus
    (score on j in the last row); `rows` are the rows trained so far, T the last. None with one row."""
    last = len(rows) - 1
    drops = []
    for task in range(last):
        earlier = [rows[t][task] for t in range(task, last) if rows[t][task] is not None]
        if earlier and rows[last][task] is not None:
            drops.append(max(earlier) - rows[last][task])
    return float(np.mean(drops)) if drops else None


def average_final(rows: Matrix) -> float | None:
    """Mean of the last row over the tasks trained so far (len(rows) of them)."""
    final = [value for value in rows[-1][: len(rows)] if value is not None]
    return float(np.mean(final)) if final else None


class Scores:
    """The matrices being filled: policy -> metric -> rows (one per task trained so far)."""

    def __init__(self, num_tasks: int, metrics: Sequence[str]):
        self.num_tasks, self.metrics = num_tasks, list(metrics)
        self.rows: dict[str, dict[str, Matrix]] = {policy: {m: [] for m in self.metrics} for policy in POLICIES}

    def add_row(self, per_task: list[dict[str, dict[str, float] | None]]) -> None:
        """The scores after one more task: per evaluated task, policy -> metric values (or None)."""
        for policy in POLICIES:
            for metric in self.metrics:
                self.rows[policy][metric].append(
                    [None if scores.get(policy) is None else scores[policy][metric] for scores in per_task])

    def summary(self, tasks: Sequence[str], **extra) -> dict[str, Any]:
        """What continual.json holds (rows not yet trained are null)."""
        trained = len(self.rows["reindex"]["mean_recall"])
        pad = lambda rows: rows + [[None] * self.num_tasks] * (self.num_tasks - len(rows))
        policies = {}
        for policy, description in POLICIES.items():
            rows = self.rows[policy]
            policies[policy] = {
                "description": description,
                "matrices": {metric: pad(rows[metric]) for metric in self.metrics},
                "average_forgetting": {metric: average_forgetting(rows[metric]) for metric in self.metrics},
                "average_final": {metric: average_final(rows[metric]) for metric in self.metrics},
            }
        return {
            "tasks": list(tasks), "tasks_trained": trained, **extra,
            "rows": "after training task t", "columns": "evaluated on task j",
            "trained": [[j <= t for j in range(self.num_tasks)] for t in range(self.num_tasks)],
            "policies": policies,
        }


def cell(value: float | None, trained: bool) -> str:
    """A matrix entry as the tables show it: (x) for a task not yet trained, — for none."""
    if value is None:
        return "—"
    return f"{value:.1f}" if trained else f"({value:.1f})"


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    """continual.md: per policy the mean recall matrix and every metric's final score and forgetting."""
    tasks = summary["tasks"]
    labels = [f"{number} {name}" for number, name in enumerate(tasks, start=1)]
    lines = [f"# Continual retrieval: {summary.get('mitigation', '')}", "",
             f"{summary['tasks_trained']} of {len(tasks)} tasks trained. Rows: after training task t; columns: "
             "evaluated on task j's test gallery. Mean recall (%, R@K both ways, averaged over languages); "
             "(x) a task not yet trained, — no index of it yet.", ""]
    for policy, result in summary["policies"].items():
        matrix = result["matrices"]["mean_recall"]
        lines += [f"## {policy}: {result['description']}", "",
                  "| after \\ on | " + " | ".join(labels) + " |", "|---" * (len(tasks) + 1) + "|"]
        for t, row in enumerate(matrix[: summary["tasks_trained"]]):
            lines.append(f"| {labels[t]} | " + " | ".join(cell(v, j <= t) for j, v in enumerate(row)) + " |")
        lines += ["", "| metric | average final | average forgetting |", "|---|---|---|"]
        for metric in result["matrices"]:
            name = metric.replace("text_to_image/", "T→I ").replace("image_to_text/", "I→T ")
            lines.append(f"| {name} | {_figure(result['average_final'][metric])} | "
                         f"{_figure(result['average_forgetting'][metric])} |")
        lines.append("")
    if folders := summary.get("task_folders"):
        lines += ["## Task folders", "", "Each is a run folder; evaluate one with `vlretrieval eval --config "
                  "<the experiment's config> --workdir FOLDER` plus its overrides (also in FOLDER/task.json):", ""]
        lines += [f"- `{folder}`: {' '.join(overrides) or '(none)'}" for folder, overrides in folders.items()]
        lines.append("")
    return "\n".join(lines)


def heatmaps(summary: dict[str, Any], path: str) -> str:
    """continual.png: the mean recall matrix of each policy as a heat map, side by side."""
    plt = pyplot()
    tasks, trained = summary["tasks"], summary["tasks_trained"]
    figure, axes = plt.subplots(1, len(summary["policies"]), figsize=(5.2 * len(summary["policies"]), 4.4))
    for axis, (policy, result) in zip(np.atleast_1d(axes), summary["policies"].items()):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in result["matrices"]["mean_recall"]])
        colours = pyplot().get_cmap("viridis").with_extremes(bad="0.85")  # bad: no index of the task yet
        image = axis.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap=colours)
        for t in range(trained):
            for j in range(len(tasks)):
                if np.isnan(matrix[t, j]):
                    axis.text(j, t, "no index yet", ha="center", va="center", fontsize=8, color="0.4")
                else:
                    axis.text(j, t, cell(matrix[t, j], j <= t), ha="center", va="center", fontsize=9,
                              color="white" if matrix[t, j] < 60 else "black", alpha=1.0 if j <= t else 0.6)
        axis.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        axis.set_yticks(range(len(tasks)), tasks)
        axis.set_xlabel("evaluated on task")
        axis.set_ylabel("after training task")
        forgetting = _figure(result["average_forgetting"]["mean_recall"])
        axis.set_title(f"{policy}: mean recall (forgetting {forgetting})", fontsize=10)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(f"continual retrieval, {summary.get('mitigation', '')}", fontsize=11)
    return save_figure(figure, path)


def write_outputs(workdir: str, summary: dict[str, Any], *, complete: bool) -> list[str]:
    """continual.json (after every task), and once `complete` continual.md and continual.png."""
    path = os.path.join(workdir, "continual.json")
    with replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
    written = [path]
    if complete:
        markdown_path = os.path.join(workdir, "continual.md")
        with replaced_atomically(markdown_path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            handle.write(markdown(summary))
        written += [markdown_path, heatmaps(summary, os.path.join(workdir, "continual.png"))]
    return written


def headline(summary: dict[str, Any], workdir: str) -> str:
    """The line the command ends with: where the files are, and each policy's final score and forgetting."""
    parts = [f"{policy} final {_figure(result['average_final']['mean_recall'])}, forgetting "
             f"{_figure(result['average_forgetting']['mean_recall'])}"
             for policy, result in summary["policies"].items()]
    return f"{os.path.join(workdir, 'continual')}.json, .md and .png written; mean recall: " + "; ".join(parts)
