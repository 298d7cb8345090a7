"""A results report beside results.json: a Markdown table and PNG plots (matplotlib, Agg backend).

- `results.md`: one row per language and the average, a column per metric found in the results
  (values as in results.json, one decimal); `format_table` is the same table's main metrics for
  the terminal;
- `recall_at_k.png`: R@K against K, one panel per direction, a line per language;
- `languages.png`: per-language bars of R@1 both ways and mean recall (when there are languages).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vlretrieval.evaluation.metrics import DIRECTIONS

# The directions of a results entry, in column order: the intra-modal ones hold label metrics only.
ARROWS = {"text_to_image": "T→I", "image_to_text": "I→T", "image_to_image": "I→I", "text_to_text": "T→T"}
ASCII_ARROWS = {"text_to_image": "T->I", "image_to_text": "I->T", "image_to_image": "I->I",
                "text_to_text": "T->T"}  # for terminals
# (results section, column title prefix): the main metrics, paired-caption and Hamming ones.
SECTIONS = ((None, ""), ("paired", "paired "), ("hamming", "Hamming "))


# The terminal table's metrics beside R@K; results.md has every metric (ranks too).
TERMINAL_METRICS = ("mAP", "mAP@R", "label_mAP", "label_mAP@R")


def table_columns(
    results: dict[str, Any], recall_at: Sequence[int] | None = None, sections=SECTIONS, arrows=ARROWS,
    only: Sequence[str] | None = None,
) -> list[tuple[str, tuple[str, ...]]]:
    """(title, key path) for every number of the average entry: per section, R@K of both
    directions, then the other metrics of both, then mean recall. R@K only for the Ks in
    `recall_at` when given, other metrics only those in `only` when given."""
    average = results["average"]
    columns = []
    for section, prefix in sections:
        entry = average if section is None else average.get(section)
        if not entry:
            continue
        base = () if section is None else (section,)
        for recalls in (True, False):
            for direction in arrows:
                for key in entry.get(direction, {}):
                    if key.startswith("R@") != recalls:
                        continue
                    if recalls and recall_at is not None and int(key[2:]) not in recall_at:
                        continue
                    if not recalls and only is not None and key not in only:
                        continue
                    columns.append((f"{prefix}{arrows[direction]} {key}", base + (direction, key)))
        if "mean_recall" in entry:
            columns.append((f"{prefix}mean recall", base + ("mean_recall",)))
    return columns


def lookup(entry: dict[str, Any], path: tuple[str, ...]) -> float:
    for key in path:
        entry = entry[key]
    return float(entry)


def _table_cells(results: dict[str, Any], columns) -> list[list[str]]:
    """The header and one row per language plus the average, values to one decimal."""
    entries = list(results["languages"].items()) + [("average", results["average"])]
    rows = [["language"] + [title for title, _ in columns]]
    rows += [[name] + [f"{lookup(entry, path):.1f}" for _, path in columns] for name, entry in entries]
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """Every metric of the results (`results.md`)."""
    header, *rows = _table_cells(results, table_columns(results))
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_table(results: dict[str, Any], recall_at: Sequence[int] | None = (1, 5, 10)) -> str:
    """The main metrics as a fixed-width table for the terminal (R@K at `recall_at`)."""
    columns = table_columns(results, recall_at, SECTIONS[:1], ASCII_ARROWS, only=TERMINAL_METRICS)
    rows = _table_cells(results, columns)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _recall_points(entry: dict[str, Any]) -> tuple[list[int], list[float]]:
    ks = sorted(int(key[2:]) for key in entry if key.startswith("R@"))
    return ks, [entry[f"R@{k}"] for k in ks]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display: files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str) -> str:
    """Lay out, write as a PNG and close `figure`; returns `path`."""
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path


def write_report(results: dict[str, Any], workdir: str, stem: str = "results") -> list[str]:
    """Write `<stem>.md`, `<stem>_recall_at_k.png` and (with languages) `<stem>_languages.png`."""
    plt = pyplot()

    written = []
    path = os.path.join(workdir, f"{stem}.md")
    with open(path, "w") as handle:
        handle.write(markdown_table(results))
    written.append(path)

    entries = list(results["languages"].items()) + [("average", results["average"])]
    if any(_recall_points(results["average"].get(d, {}))[0] for d in DIRECTIONS):
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for axis, direction in zip(axes, DIRECTIONS):
            for name, entry in entries:
                ks, values = _recall_points(entry.get(direction, {}))
                axis.plot(ks, values, marker="o", linewidth=2.5 if name == "average" else 1.2, label=name)
            axis.set_xscale("log")
            ks = _recall_points(results["average"].get(direction, {}))[0]
            axis.set_xticks(ks, [str(k) for k in ks])
            axis.minorticks_off()
            axis.set_title(f"{ARROWS[direction]} recall@K")
            axis.set_xlabel("K")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("R@K (%)")
        axes[1].legend(fontsize=8)
        written.append(save_figure(figure, os.path.join(workdir, f"{stem}_recall_at_k.png")))

    languages = list(results["languages"])
    bars = [(f"{ARROWS[d]} R@1", (d, "R@1")) for d in DIRECTIONS if "R@1" in results["average"].get(d, {})]
    if "mean_recall" in results["average"]:
        bars.append(("mean recall", ("mean_recall",)))
    if languages and bars:
        figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(languages) + 2), 3.6))
        width = 0.8 / len(bars)
        for offset, (title, path_keys) in enumerate(bars):
            values = [lookup(results["languages"][language], path_keys) for language in languages]
            axis.bar([i + offset * width for i in range(len(languages))], values, width, label=title)
        axis.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(languages))], languages)
        axis.set_ylabel("%")
        axis.set_title("per language")
        axis.legend(fontsize=8)
        written.append(save_figure(figure, os.path.join(workdir, f"{stem}_languages.png")))
    return written
