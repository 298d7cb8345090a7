"""The results report: valid PNG plots, and a Markdown table that matches results.json."""

import json

import numpy as np
from PIL import Image

from vlretrieval.evaluation import metrics, report
from vlretrieval.evaluation.evaluate import write_results


def results_for_two_languages():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 6)).astype(np.float32)
    owners = np.repeat(np.arange(20), 2)
    per_language = {}
    for language, noise in (("en", 0.5), ("de", 1.5)):
        texts = images[owners] + noise * rng.normal(size=(40, 6)).astype(np.float32)
        per_language[language] = metrics.bidirectional_metrics(
            images, texts, owners, (1, 5, 10), ("recall", "rank", "mean_recall", "map", "paired_recall"))
    return {"languages": per_language, "average": metrics.average_over_languages(per_language)}


def test_report_files_are_valid_and_the_table_matches_results_json(tmp_path):
    results = results_for_two_languages()
    write_results(results, str(tmp_path))
    written = report.write_report(results, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == [
        "results.md", "results_languages.png", "results_recall_at_k.png"]
    for path in written[1:]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()

    saved = json.loads((tmp_path / "results.json").read_text())
    lines = (tmp_path / "results.md").read_text().strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    columns = dict(report.table_columns(saved))
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    assert set(rows) == {"en", "de", "average"}
    assert {"T→I R@1", "I→T mAP", "paired T→I R@5", "mean recall"} <= set(header)
    for name, row in rows.items():
        entry = saved["average"] if name == "average" else saved["languages"][name]
        for title, text in row.items():
            assert float(text) == round(report.lookup(entry, columns[title]), 1), (name, title)


def test_the_terminal_table_is_the_same_table_with_the_main_metrics():
    # One renderer: the terminal's table is results.md's, less ranks and the paired/Hamming
    # sections, R@K at config.eval.recall_at, ASCII arrows.
    results = json.loads(json.dumps(results_for_two_languages()))
    terminal = report.format_table(results, recall_at=(1, 5))
    header = terminal.splitlines()[0].split("  ")
    header = [cell.strip() for cell in header if cell.strip()]
    markdown = report.markdown_table(results).splitlines()[0]
    assert header[:5] == ["language", "T->I R@1", "T->I R@5", "I->T R@1", "I->T R@5"]
    assert header[-1] == "mean recall"
    assert "T->I mAP" in header and "I->T mAP" in header
    assert not any("rank" in cell or "paired" in cell or "Hamming" in cell for cell in header)
    assert "R@10" not in terminal and "T→I R@10" in markdown and "paired T→I R@5" in markdown
    average = terminal.splitlines()[-1].split()
    assert average[0] == "average"
    assert float(average[1]) == round(results["average"]["text_to_image"]["R@1"], 1)
