"""What `vlretrieval benchmark` writes: one JSON per (dataset, language, task) with CLIP_benchmark's
field names beside ours, a merged CSV and Markdown table, and PNG bar charts, all from the same
numbers.

CLIP_benchmark's names and scale (fractions, not percent): retrieval is `zeroshot_retrieval` with
`image_retrieval_recall@K` (a caption retrieves images: our text->image R@K / 100) and
`text_retrieval_recall@K` (image->text); classification is `zeroshot_classification` with
`acc1`, `acc5`, `mean_per_class_recall`. Our own figures (percent) are under "vlretrieval".
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any

from vlretrieval.evaluation import report
from vlretrieval.files import replaced_atomically

CLIP_BENCHMARK_TASKS = {"retrieval": "zeroshot_retrieval", "zero_shot_classification": "zeroshot_classification"}
ZERO_SHOT_COLUMNS = (("top-1", "top1"), ("top-5", "top5"), ("mean per-class recall", "mean_per_class_recall"))
# Zero-shot prompts are the templates' language: English for the shipped ones (CLIP_benchmark's default).
PROMPT_LANGUAGE = "en"


def _retrieval_columns(rows) -> list[tuple[str, tuple[str, str]]]:
    ks = sorted({int(key[2:]) for row in rows for key in row["metrics"]["text_to_image"] if key.startswith("R@")})
    return ([(f"T→I R@{k}", ("text_to_image", f"R@{k}")) for k in ks]
            + [(f"I→T R@{k}", ("image_to_text", f"R@{k}")) for k in ks] + [("mean recall", ("mean_recall",))])


def _value(metrics: dict, path) -> float:
    for key in path:
        metrics = metrics[key]
    return float(metrics)


def clip_benchmark_metrics(row: dict) -> dict[str, float]:
    values = row["metrics"]
    if row["task"] == "retrieval":
        found = {}
        for direction, name in (("text_to_image", "image_retrieval"), ("image_to_text", "text_retrieval")):
            for key, value in values[direction].items():
                if key.startswith("R@"):
                    found[f"{name}_recall@{key[2:]}"] = value / 100
        return found
    return {"acc1": values["top1"] / 100, "acc5": values["top5"] / 100,
            "mean_per_class_recall": values["mean_per_class_recall"] / 100}


def _file_name(row: dict) -> str:
    safe = lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text))
    return f"{safe(row['name'])}_{safe(row.get('language') or PROMPT_LANGUAGE)}_{row['task']}.json"


def write_report(outcome: dict[str, Any], output: str, model: dict[str, Any]) -> list[str]:
    """Writes every file into `output` (created); returns their paths. `model`: what was
    evaluated (workdir, step, model kind and config hash), recorded in each JSON."""
    os.makedirs(output, exist_ok=True)
    written = []
    rows = [row for row in outcome["results"] if "skipped" not in row]
    for row in rows:
        record = {
            "dataset": row["name"], "model": model.get("kind"), "pretrained": model.get("workdir"),
            "task": CLIP_BENCHMARK_TASKS[row["task"]], "language": row.get("language") or PROMPT_LANGUAGE,
            "metrics": clip_benchmark_metrics(row),
            "vlretrieval": {"split": row["split"], "num_images": row["num_images"], "metrics": row["metrics"],
                            **model},
        }
        written.append(_write_json(os.path.join(output, _file_name(row)), record))
    written.append(_write_json(os.path.join(output, "suite.json"),
                               {**outcome, "model": model, "group_means": group_means(rows)}))
    written.append(_write_csv(os.path.join(output, "results.csv"), outcome["results"]))
    written.append(_write_markdown(os.path.join(output, "results.md"), outcome["results"]))
    written.extend(_write_plots(output, rows))
    return written


def _write_json(path: str, record: dict) -> str:
    with replaced_atomically(path) as temporary, open(temporary, "w") as handle:
        json.dump(record, handle, indent=2)
    return path


def _flat_metrics(row: dict) -> dict[str, float]:
    if "skipped" in row:
        return {}
    if row["task"] == "retrieval":
        return {title: _value(row["metrics"], path) for title, path in _retrieval_columns([row])}
    return {title: float(row["metrics"][key]) for title, key in ZERO_SHOT_COLUMNS}


def _write_csv(path: str, results: list[dict]) -> str:
    columns = []
    for row in results:
        columns += [name for name in _flat_metrics(row) if name not in columns]
    with replaced_atomically(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "task", "split", "language", *columns, "skipped"])
        for row in results:
            values = _flat_metrics(row)
            writer.writerow([row["name"], row["task"], row["split"], row.get("language") or "",
                             *(f"{values[c]:.4f}" if c in values else "" for c in columns), row.get("skipped", "")])
    return path


def _write_markdown(path: str, results: list[dict]) -> str:
    lines = []
    retrieval = [row for row in results if row["task"] == "retrieval" and "skipped" not in row]
    if retrieval:
        columns = _retrieval_columns(retrieval)
        lines += ["## Retrieval", "", "| dataset | language | " + " | ".join(t for t, _ in columns) + " |",
                  "|---|---|" + "---:|" * len(columns)]
        lines += [f"| {row['name']} | {row['language']} | "
                  + " | ".join(f"{_value(row['metrics'], p):.1f}" for _, p in columns) + " |" for row in retrieval]
        lines.append("")
    zero_shot = [row for row in results if row["task"] == "zero_shot_classification" and "skipped" not in row]
    if zero_shot:
        titles = " | ".join(title for title, _ in ZERO_SHOT_COLUMNS)
        lines += ["## Zero-shot classification", "", f"| dataset | {titles} |",
                  "|---|" + "---:|" * len(ZERO_SHOT_COLUMNS)]
        lines += [f"| {row['name']} | " + " | ".join(f"{float(row['metrics'][k]):.1f}" for _, k in ZERO_SHOT_COLUMNS)
                  + " |" for row in zero_shot]
        lines.append("")
    lines += _group_lines(retrieval)
    skipped = [row for row in results if "skipped" in row]
    if skipped:
        lines += ["## Skipped", ""] + [f"- {row['name']} ({row['task']}): {row['skipped']}" for row in skipped] + [""]
    with replaced_atomically(path) as temporary, open(temporary, "w") as handle:
        handle.write("\n".join(lines))
    return path


def group_means(rows: list[dict]) -> dict[str, float]:
    """Mean over a group's retrieval results (datasets x languages) of their mean recall."""
    grouped: dict[str, list[float]] = {}
    for row in rows:
        if row["task"] == "retrieval" and row.get("group") and "skipped" not in row:
            grouped.setdefault(row["group"], []).append(float(row["metrics"]["mean_recall"]))
    return {group: sum(values) / len(values) for group, values in grouped.items()}


def _group_lines(retrieval: list[dict]) -> list[str]:
    """One table per task group (scene- vs object-centric), each closed by the group's mean."""
    grouped = [row for row in retrieval if row.get("group")]
    if not grouped:
        return []
    columns = _retrieval_columns(grouped)
    lines = ["## By group", "", "| group | dataset | language | " + " | ".join(t for t, _ in columns) + " |",
             "|---|---|---|" + "---:|" * len(columns)]
    for group in dict.fromkeys(row["group"] for row in grouped):
        members = [row for row in grouped if row["group"] == group]
        for row in members:
            lines.append(f"| {group} | {row['name']} | {row['language']} | "
                         + " | ".join(f"{_value(row['metrics'], p):.1f}" for _, p in columns) + " |")
        means = [sum(_value(row["metrics"], p) for row in members) / len(members) for _, p in columns]
        lines.append(f"| **{group} mean** | | | " + " | ".join(f"**{value:.1f}**" for value in means) + " |")
    return [*lines, ""]


def _write_plots(output: str, rows: list[dict]) -> list[str]:
    plt = report.pyplot()
    written = []
    for task, title, value in (
        ("retrieval", "mean recall (%)", lambda row: row["metrics"]["mean_recall"]),
        ("zero_shot_classification", "top-1 accuracy (%)", lambda row: row["metrics"]["top1"]),
    ):
        chosen = [row for row in rows if row["task"] == task]
        if not chosen:
            continue
        labels = [row["name"] + (f" ({row['language']})" if row.get("language") else "") for row in chosen]
        figure, axis = plt.subplots(figsize=(max(4, 0.8 * len(chosen) + 2), 3.5))
        axis.bar(range(len(chosen)), [value(row) for row in chosen])
        axis.set_xticks(range(len(chosen)), labels, rotation=30, ha="right")
        axis.set_ylabel(title)
        axis.set_ylim(0, 100)
        written.append(report.save_figure(figure, os.path.join(output, f"{task}.png")))
    return written
