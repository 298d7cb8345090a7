"""Label mAP of contrastive training alone against contrastive + the IDCMR label terms, same steps and seeds.

  python benchmarks/label_retrieval.py [--workdir workdir/label_retrieval] [--data_dir data]
                                       [--seeds 0 1 2] [--steps 200] [--batch_size 64]
                                       [--labels dominant_colour]

On the demo scenes labelled by `--labels` (`config.data.labels`; dominant_colour: one category a
scene, the colour covering the largest area), the demo's tiny model (configs/demo.py:tiny) is
trained per seed on the same data with the same steps and seed three times: `contrastive`
(symmetric InfoNCE alone), `contrastive+idcmr` (plus `label_intra_modal` and `label_inter_modal`
at weight 1 with their defaults: scale 5, modality invariance 1; docs/labels.md) and
`contrastive+idcmr_scale0.5` (the same at DSCMR's scale 1/2). Each run is evaluated on the test
split (English) with `eval.metrics=('recall','mean_recall','label_map','label_map_at_r')`: label mAP
and mAP@R in the four directions, instance R@1 both ways and mean recall. The train split holds
steps x batch_size scenes, so each run sees every training scene once (one epoch). The runs share
a JAX compilation cache under the workdir (the same programs compile once). Prints one JSON object
per run, then the mean and population std over seeds per run and metric.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results

from vlretrieval import arguments
from vlretrieval.data.labels import DEMO_LABELS

COMMON = ["--config.data.num_test=300", "--config.data.languages=('en',)",
          "--config.optimizer.warmup_steps=20", "--config.eval.report=false", "--config.eval.batch_size=100",
          "--config.eval.metrics=('recall','mean_recall','label_map','label_map_at_r')"]
RUNS = {
    "contrastive": [],
    "contrastive+idcmr": ["--config.objectives.label_intra_modal=1.0", "--config.objectives.label_inter_modal=1.0"],
    "contrastive+idcmr_scale0.5": ["--config.objectives.label_intra_modal=1.0",
                                   "--config.objectives.label_inter_modal=1.0",
                                   "--config.objectives.label_similarity_scale=0.5"],
}
DIRECTIONS = ("image_to_text", "text_to_image", "image_to_image", "text_to_text")


def figures(results: dict) -> dict:
    """The averaged (English-only: the one language) metrics of a run's results.json."""
    average = results["average"]
    found = {f"{direction}_{key}": round(average[direction][key], 2)
             for direction in DIRECTIONS for key in ("label_mAP", "label_mAP@R")}
    found.update({f"{direction}_R@1": round(average[direction]["R@1"], 2) for direction in DIRECTIONS[:2]})
    found["mean_recall"] = round(average["mean_recall"], 2)
    return found


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/label_retrieval")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=arguments.positive_int, default=200)
    parser.add_argument("--batch_size", type=arguments.positive_int, default=64)
    parser.add_argument("--labels", default="dominant_colour", choices=DEMO_LABELS)
    args, extra = parser.parse_known_args()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    records = []
    for seed in args.seeds:
        scenes = args.steps * args.batch_size
        base = [*COMMON, f"--config.data.labels={args.labels}", f"--config.data.num_train={scenes}",
                f"--config.train.batch_size={args.batch_size}", f"--config.train.num_steps={args.steps}",
                f"--config.train.checkpoint_every={args.steps}", f"--config.train.log_every={args.steps}",
                f"--config.seed={seed}", *extra]
        for name, settings in RUNS.items():
            workdir = os.path.join(args.workdir, args.labels, f"seed_{seed}", name.replace("+", "_"))
            results = train_and_read_results("configs/demo.py:tiny", workdir, args.data_dir, [*base, *settings])
            record = {"seed": seed, "run": name, "labels": args.labels, "steps": args.steps,
                      "batch_size": args.batch_size, "train_and_eval_seconds": results["seconds"], **figures(results)}
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {}
    for name in RUNS:
        chosen = [r for r in records if r["run"] == name]
        summary[name] = {key: [round(statistics.mean(r[key] for r in chosen), 2),
                               round(statistics.pstdev(r[key] for r in chosen), 2)]
                         for key in chosen[0] if "mAP" in key or "R@1" in key or key == "mean_recall"}
    print(json.dumps({"labels": args.labels, "seeds": args.seeds, "steps": args.steps,
                      "mean_and_std_over_seeds": summary}))


if __name__ == "__main__":
    arguments.run(main)
