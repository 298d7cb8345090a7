"""The MURAL effect on the demo data: the low-resource language with and without translation pairs.

  python benchmarks/mural_lowres.py [--workdir workdir/mural_lowres] [--data_dir data] [--seeds 0 1]

Trains `configs/mural_demo.py:baseline` (image-text only) and `configs/mural_demo.py` (image-text
plus translation pairs) for the same number of steps, for each seed, prints both results tables
and one JSON object per seed: each language's mean recall in both runs, the low-resource
language's multitask / baseline ratio, its gap to English, and the largest drop of any other
language. With several seeds a last JSON object gives the same figures for the mean over seeds
(one 500-step demo run's mean recall moves by a few points with the seed alone). A finished run's
workdir is reused (it is only evaluated again). Extra arguments go to every run (e.g.
--config.train.num_steps=200).
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results

from vlretrieval import arguments
from vlretrieval.data.builders.captions import LOW_RESOURCE_LANGUAGE
from vlretrieval.evaluation.report import format_table

RUNS = (("baseline", "configs/mural_demo.py:baseline"), ("multitask", "configs/mural_demo.py"))


def summary(mean_recall: dict) -> dict:
    """The acceptance figures from {run: {language: mean recall}}."""
    low = LOW_RESOURCE_LANGUAGE
    others = [language for language in mean_recall["baseline"] if language != low]
    return {
        "mean_recall": mean_recall,
        "low_resource_language": low,
        "low_resource_ratio_multitask_to_baseline": round(
            mean_recall["multitask"][low] / max(mean_recall["baseline"][low], 1e-9), 2),
        "low_resource_gap_to_english_points": round(
            mean_recall["multitask"]["en"] - mean_recall["multitask"][low], 2),
        "largest_drop_of_another_language_points": round(max(
            mean_recall["baseline"][lang] - mean_recall["multitask"][lang] for lang in others), 2),
    }


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/mural_lowres")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args, extra = parser.parse_known_args()
    per_seed = []
    for seed in args.seeds:
        mean_recall = {}
        for name, config in RUNS:
            workdir = os.path.join(args.workdir, f"seed_{seed}", name)
            run = train_and_read_results(config, workdir, args.data_dir, extra, seed=seed)
            print(f"\nseed {seed}, {name} ({run['seconds']:.0f} s)")
            print(format_table(run, (1, 5, 10)), flush=True)
            mean_recall[name] = {language: round(metrics["mean_recall"], 2)
                                 for language, metrics in run["languages"].items()}
        per_seed.append(mean_recall)
        print(json.dumps({"seed": seed, **summary(mean_recall)}), flush=True)
    if len(per_seed) > 1:
        mean = {name: {language: round(statistics.mean(seed[name][language] for seed in per_seed), 2)
                       for language in per_seed[0][name]}
                for name, _ in RUNS}
        print(json.dumps({"seeds": args.seeds, "mean_over_seeds": summary(mean)}))


if __name__ == "__main__":
    arguments.run(main)
