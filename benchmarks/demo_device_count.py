"""The demo trained on 1 device and on 8 (fake CPU) devices reaches the same recall.

  python benchmarks/demo_device_count.py [--config configs/demo.py] [--workdir workdir/devices]
                                         [--seeds 0 1 2]

Runs `vlretrieval train` in subprocesses, with `XLA_FLAGS` faking 1 and 8 CPU devices (the global
batch, data order and initialisation are the same; only the layout differs), for each seed, reads
each run's `results.json` and prints one JSON object per run, then each averaged R@K's mean over
the seeds on 1 and on 8 devices and their difference. Every step is exact to float rounding;
what a run amplifies that rounding into is the recipe's spread, which the seeds show (at 500 steps,
still far from converged, it reached 15 points of R@1 at one seed; the demo now trains 1,000).
Extra arguments go to every run (e.g. --config.train.num_steps=100).
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results  # noqa: E402

from vlretrieval import arguments  # noqa: E402

DEVICE_COUNTS = (1, 8)


def recalls(results: dict) -> dict:
    return {
        f"{direction} {metric}": value
        for direction in ("text_to_image", "image_to_text")
        for metric, value in results["average"][direction].items()
        if metric.startswith("R@")
    }


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--workdir", default="workdir/devices")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args, extra = parser.parse_known_args()
    runs = {devices: [] for devices in DEVICE_COUNTS}
    for seed in args.seeds:
        for devices in DEVICE_COUNTS:
            workdir = os.path.join(args.workdir, f"seed_{seed}", f"{devices}_devices")
            results = train_and_read_results(args.config, workdir, args.data_dir, extra, devices, seed)
            runs[devices].append(recalls(results))
            print(json.dumps({"seed": seed, "devices": devices, "seconds": results["seconds"],
                              "recall": runs[devices][-1]}), flush=True)
    means = {devices: {name: round(statistics.mean(run[name] for run in seeds), 2) for name in seeds[0]}
             for devices, seeds in runs.items()}
    differences = {name: round(abs(means[1][name] - means[8][name]), 2) for name in means[1]}
    per_seed = [max(abs(one[name] - eight[name]) for name in one) for one, eight in zip(runs[1], runs[8])]
    print(json.dumps({"seeds": args.seeds, "mean_recall_over_seeds": means,
                      "largest_difference_of_means_points": max(differences.values()),
                      "differences_of_means": differences,
                      "largest_difference_per_seed_points": [round(d, 2) for d in per_seed]}))


if __name__ == "__main__":
    arguments.run(main)
