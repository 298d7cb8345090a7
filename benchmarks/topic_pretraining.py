"""TextTopicNet on the labelled demo: topic pre-training, topic-space retrieval, and the pre-trained
image tower as the initialisation of contrastive training against random initialisation.

  python benchmarks/topic_pretraining.py [--workdir workdir/topic_pretraining] [--data_dir data]
                                         [--seeds 0 1 2] [--steps 300] [--num_topics 10]

Per seed, on the demo scenes labelled by their dominant shape (`config.data.labels=dominant_shape`,
5 categories; 2,048 training and 200 test scenes, English captions), the demo's tiny model
(configs/demo.py:tiny: decomposed, 32 wide, 1 layer; batch 64, learning rate 0.003) is trained
three times for `--steps` steps with the same seed and data:
- `topics`: topic pre-training alone (objectives.contrastive=0, objectives.topic_prediction=1,
  model.head.num_topics=`--num_topics`; the LDA is fitted on each training scene's 5 captions
  joined), evaluated in topic space (eval.mode=topics: predicted topics of the images x the LDA's
  topics of the captions, Bhattacharyya coefficient);
- `contrastive_from_topics`: InfoNCE from the `topics` run's parameters (train.init_from; the same
  model config, the topic head kept but unused);
- `contrastive_from_random`: InfoNCE from random initialisation, the same model config;
- `contrastive_from_random_2x`: the same for twice the steps: as many steps in all as
  pre-training + contrastive (the pre-trained run has had more updates, if not of this objective).
Every run is evaluated on the test split: R@1/5/10 both ways, mean recall, and label mAP in the four
directions (a shared dominant shape is relevant). Chance: R@K of a random ranking (exact), label mAP
of random embeddings (the mean of 5 draws). The runs share a JAX compilation cache under the
workdir. Prints one JSON object per run, then chance, then the mean and population std over seeds.
"""

import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results

from vlretrieval import arguments

SPEC = "configs/demo.py:tiny"
TEST_IMAGES, CAPTIONS = 200, 5
COMMON = ["--config.data.num_train=2048", f"--config.data.num_test={TEST_IMAGES}", "--config.data.languages=('en',)",
          "--config.data.labels=dominant_shape", "--config.train.batch_size=64",
          "--config.optimizer.learning_rate=0.003", "--config.optimizer.warmup_steps=20",
          "--config.eval.report=false", "--config.eval.batch_size=100",
          "--config.eval.metrics=('recall','mean_recall','label_map')"]
DIRECTIONS = ("text_to_image", "image_to_text", "image_to_image", "text_to_text")
RECALL_AT = (1, 5, 10)


def figures(results: dict) -> dict:
    """A run's averaged metrics (one language): R@K both ways, mean recall, label mAP four ways."""
    average = results["average"]
    found = {f"{d}_R@{k}": round(average[d][f"R@{k}"], 2) for d in DIRECTIONS[:2] for k in RECALL_AT}
    found.update({f"{d}_label_mAP": round(average[d]["label_mAP"], 2) for d in DIRECTIONS})
    found["mean_recall"] = round(average["mean_recall"], 2)
    return found


def chance(seed: int, data_dir: str) -> dict:
    """R@K of a random ranking over the test split, and label mAP of random embeddings."""
    import numpy as np

    from vlretrieval.config import load_config
    from vlretrieval.data import datasets
    from vlretrieval.evaluation.label_metrics import label_metrics

    texts = TEST_IMAGES * CAPTIONS
    found = {f"text_to_image_R@{k}": round(100 * k / TEST_IMAGES, 2) for k in RECALL_AT}
    # image -> text hits when any of its CAPTIONS captions is among the top K of all captions.
    found.update({f"image_to_text_R@{k}": round(100 * (1 - math.comb(texts - CAPTIONS, k) / math.comb(texts, k)), 2)
                  for k in RECALL_AT})
    config = load_config(SPEC, [o.removeprefix("--config.") for o in COMMON] + [f"seed={seed}",
                                                                               f"data.data_dir={data_dir}"])
    labels = datasets.open_dataset(config.data, seed=seed, training=False).labels("test", "chance")[:TEST_IMAGES]
    owners = np.repeat(np.arange(TEST_IMAGES), CAPTIONS)
    rng = np.random.default_rng(seed)
    draws = [label_metrics(rng.normal(size=(TEST_IMAGES, 32)), rng.normal(size=(texts, 32)), owners, labels,
                           ("label_map",)) for _ in range(5)]
    found.update({f"{d}_label_mAP": round(statistics.mean(draw[d]["label_mAP"] for draw in draws), 2)
                  for d in DIRECTIONS})
    return found


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/topic_pretraining")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=arguments.positive_int, default=300)
    parser.add_argument("--num_topics", type=arguments.positive_int, default=10)
    args, extra = parser.parse_known_args()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    records, chances = [], []
    for seed in args.seeds:
        base = [*COMMON, f"--config.train.num_steps={args.steps}", f"--config.train.checkpoint_every={args.steps}",
                f"--config.train.log_every={args.steps}", f"--config.model.head.num_topics={args.num_topics}",
                f"--config.seed={seed}", *extra]
        pretrained = os.path.join(args.workdir, f"seed_{seed}", "topics")
        runs = {
            "topics": (pretrained, ["--config.objectives.contrastive=0", "--config.objectives.topic_prediction=1",
                                    "--config.eval.mode=topics"], "results_topics.json"),
            "contrastive_from_topics": (os.path.join(args.workdir, f"seed_{seed}", "contrastive_from_topics"),
                                        [f"--config.train.init_from={pretrained}"], "results.json"),
            "contrastive_from_random": (os.path.join(args.workdir, f"seed_{seed}", "contrastive_from_random"),
                                        [], "results.json"),
            "contrastive_from_random_2x": (os.path.join(args.workdir, f"seed_{seed}", "contrastive_from_random_2x"),
                                           [f"--config.train.{key}={2 * args.steps}" for key in
                                            ("num_steps", "checkpoint_every", "log_every")], "results.json"),
        }
        for name, (workdir, settings, results_name) in runs.items():
            results = train_and_read_results(SPEC, workdir, args.data_dir, [*base, *settings],
                                             results_name=results_name)
            with open(os.path.join(workdir, "metrics.jsonl")) as handle:
                last = json.loads(handle.readlines()[-1])
            steps = 2 * args.steps if name.endswith("_2x") else args.steps
            record = {"seed": seed, "run": name, "steps": steps, "num_topics": args.num_topics,
                      "train_and_eval_seconds": results["seconds"], "final_loss": round(last["loss"], 4),
                      **figures(results)}
            if name == "topics":
                record["final_topic_kl"] = round(last["topic_prediction_kl"], 4)
            records.append(record)
            print(json.dumps(record), flush=True)
        chances.append(chance(seed, args.data_dir))
    keys = list(chances[0])
    print(json.dumps({"run": "chance", "seeds": args.seeds,
                      **{key: round(statistics.mean(c[key] for c in chances), 2) for key in keys}}), flush=True)
    summary = {}
    for name in dict.fromkeys(r["run"] for r in records):
        chosen = [r for r in records if r["run"] == name]
        summary[name] = {key: [round(statistics.mean(r[key] for r in chosen), 2),
                               round(statistics.pstdev(r[key] for r in chosen), 2)]
                         for key in chosen[0] if key in keys or key == "mean_recall"}
    print(json.dumps({"machine": "2-core CPU", "seeds": args.seeds, "steps": args.steps,
                      "num_topics": args.num_topics, "mean_and_std_over_seeds": summary}))


if __name__ == "__main__":
    arguments.run(main)
