"""The demo trained on 1 device and on 8 (fake CPU) devices reaches the same recall.

  python benchmarks/demo_device_count.py [--config configs/demo.py] [--workdir workdir/devices]

Runs `vlretrieval train` twice in subprocesses, with `XLA_FLAGS` faking 1 and 8 CPU devices (the
global batch, data order and initialisation are the same; only the layout differs), reads each
run's `results.json` and prints one JSON object per run and the largest difference in any
averaged R@K. Extra arguments go to both runs (e.g. --config.train.num_steps=100).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runs import train_and_read_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--workdir", default="workdir/devices")
    parser.add_argument("--data_dir", default="data")
    args, extra = parser.parse_known_args()
    runs = []
    for devices in (1, 8):
        workdir = os.path.join(args.workdir, f"{devices}_devices")
        results = train_and_read_results(args.config, workdir, args.data_dir, extra, devices)
        runs.append({"devices": devices, "seconds": results["seconds"], "average": results["average"]})
        print(json.dumps(runs[-1]), flush=True)
    differences = {
        f"{direction} {metric}": round(
            abs(runs[0]["average"][direction][metric] - runs[1]["average"][direction][metric]), 2
        )
        for direction in ("text_to_image", "image_to_text")
        for metric in runs[0]["average"][direction]
        if metric.startswith("R@")
    }
    print(json.dumps({"largest_recall_difference_points": max(differences.values()),
                      "differences": differences}))


if __name__ == "__main__":
    main()
