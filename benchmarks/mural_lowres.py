"""The MURAL effect on the demo data: the low-resource language with and without translation pairs.

  python benchmarks/mural_lowres.py [--workdir workdir/mural_lowres] [--data_dir data]

Trains `configs/mural_demo.py:baseline` (image-text only) and `configs/mural_demo.py` (image-text
plus translation pairs) for the same number of steps, prints both results tables and one JSON
object: each language's mean recall in both runs, the low-resource language's multitask /
baseline ratio, its gap to English, and the largest drop of any other language. Extra arguments
go to both runs (e.g. --config.train.num_steps=200).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results  # noqa: E402

from vlretrieval.data.builders.captions import LOW_RESOURCE_LANGUAGE  # noqa: E402
from vlretrieval.evaluate import format_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/mural_lowres")
    parser.add_argument("--data_dir", default="data")
    args, extra = parser.parse_known_args()
    runs = {}
    for name, config in (("baseline", "configs/mural_demo.py:baseline"),
                         ("multitask", "configs/mural_demo.py")):
        runs[name] = train_and_read_results(
            config, os.path.join(args.workdir, name), args.data_dir, extra
        )
        print(f"\n{name} ({runs[name]['seconds']:.0f} s)")
        print(format_table(runs[name], (1, 5, 10)), flush=True)
    mean_recall = {
        name: {language: round(metrics["mean_recall"], 2)
               for language, metrics in run["languages"].items()}
        for name, run in runs.items()
    }
    low = LOW_RESOURCE_LANGUAGE
    others = [language for language in mean_recall["baseline"] if language != low]
    print(json.dumps({
        "mean_recall": mean_recall,
        "low_resource_language": low,
        "low_resource_ratio_multitask_to_baseline": round(
            mean_recall["multitask"][low] / max(mean_recall["baseline"][low], 1e-9), 2),
        "low_resource_gap_to_english_points": round(
            mean_recall["multitask"]["en"] - mean_recall["multitask"][low], 2),
        "largest_drop_of_another_language_points": round(max(
            mean_recall["baseline"][lang] - mean_recall["multitask"][lang] for lang in others), 2),
    }))


if __name__ == "__main__":
    main()
