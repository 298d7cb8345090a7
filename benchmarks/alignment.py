"""Pooled towers vs TERAN's late interaction vs the joint model, on the demo region features.

  python benchmarks/alignment.py [--workdir workdir/alignment] [--data_dir data] [--seeds 0 1 2]

For each seed, three runs of `configs/demo_regions.py` with the same steps, batch and seed (the
seed also draws the demo data): `towers` (InfoNCE on pooled embeddings), `teran` (the hinge over
word x region late-interaction scores) and `joint` (the single-stream model pre-trained with
InfoNCE, ITM, MLM and masked region modelling). Each is evaluated on the 1,000-image x 5,000-caption
test gallery (English): recall and NDCG@25 (ROUGE-L relevance), by the pooled towers (towers,
joint), by late interaction over every pair (teran), and by the joint model re-ordering the
towers' top-20 (joint: every pair would be 5M joint passes). Timings are of the whole gallery,
embedding included, after a warm-up call (compilation excluded): towers, late interaction over
every pair, and the joint model over every pair, extrapolated from `--joint_images` images x all
captions (the figure says so). Prints one JSON object per seed and run, then the means over seeds.
Extra arguments go to every training run (e.g. --config.train.num_steps=200).
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results

from vlretrieval import arguments

RUNS = ("towers", "teran", "joint")
SETTINGS = ["--config.train.num_steps=300", "--config.train.batch_size=64", "--config.optimizer.warmup_steps=30",
            "--config.train.checkpoint_every=300", "--config.data.languages=('en',)", "--config.eval.mode=towers",
            "--config.eval.report=false", "--config.eval.metrics=('recall','mean_recall')"]


def _timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def evaluate_run(name: str, config_spec: str, workdir: str, overrides: list[str], joint_images: int) -> dict:
    """Recall / NDCG in the run's own scoring, and the timings of the three scorings."""
    import numpy as np

    from vlretrieval import parallel
    from vlretrieval.config import load_config
    from vlretrieval.evaluation import checkpoints, rerank
    from vlretrieval.evaluation.evaluate import evaluate_split, subset

    config = load_config(config_spec, [o.removeprefix("--config.") for o in overrides])
    model, params, data, _ = checkpoints.restore_for_evaluation(config, workdir)
    mesh = parallel.make_mesh(1)
    split = checkpoints.evaluation_split(config, data)
    options = checkpoints.towers_options(config)
    options["metrics"] = ("recall", "mean_recall", "ndcg")

    def run(mode: str, gallery=split, **extra):
        return evaluate_split(model, params, gallery, data.tokenizer, mesh=mesh, mode=mode, **options, **extra)

    record = {"run": name}
    for mode in ("late_interaction",) if name == "teran" else ("towers",):  # each run in its own scoring
        results = run(mode)
        # Timed without NDCG (its ROUGE-L matrix is the metric's cost, not retrieval's), after a
        # warm-up call that compiles: the timing is the gallery's, not XLA's.
        options["metrics"] = ("recall", "mean_recall")
        run(mode, subset(split, 50))
        _, seconds = _timed(lambda mode=mode: run(mode))
        options["metrics"] = ("recall", "mean_recall", "ndcg")
        record[f"{mode}_seconds"] = round(seconds, 2)
        record[mode] = {direction: {key: round(value, 2) for key, value in results["average"][direction].items()
                                    if key in ("R@1", "R@5", "R@10", "NDCG@25")}
                        for direction in ("text_to_image", "image_to_text")}
        record[mode]["mean_recall"] = round(results["average"]["mean_recall"], 2)
    if name == "joint":
        options["metrics"] = ("recall", "mean_recall")
        results, seconds = _timed(lambda: run("rerank", shortlist_size=20, pair_batch_size=500))
        record["joint_rerank_top20"] = {"mean_recall": round(results["average"]["mean_recall"], 2),
                                        "text_to_image_R@1": round(results["average"]["text_to_image"]["R@1"], 2),
                                        "seconds": round(seconds, 2)}
        scorer = rerank.make_pair_scorer(model, params, mesh, 500)
        texts = [c for captions in split["captions"]["en"] for c in captions]
        token_ids, text_mask = data.tokenizer.encode(texts, config.data.max_text_length)
        images = np.asarray(split["images"][:joint_images], np.float32)
        rerank.all_pairs_scores(scorer, token_ids[:500], text_mask[:500], images[:1])  # compile
        _, seconds = _timed(lambda: rerank.all_pairs_scores(scorer, token_ids, text_mask, images))
        record["joint_all_pairs_seconds_extrapolated"] = round(seconds * len(split["images"]) / joint_images, 1)
        record["joint_all_pairs_measured_on"] = f"{joint_images} images x {len(texts)} captions"
    return record


def _remember_relevance() -> None:
    """The ROUGE-L relevance of a gallery's captions is the same for every run of a seed: compute it
    once (34 s for 5,000 captions on a 2-core CPU)."""
    from vlretrieval.evaluation import relevance

    compute, seen = relevance.rouge_l_matrix, {}

    def remembered(captions, caption_owners, num_images, block=64):
        key = (tuple(captions), tuple(caption_owners), num_images)
        if key not in seen:
            seen[key] = compute(captions, caption_owners, num_images, block)
        return seen[key]

    relevance.rouge_l_matrix = remembered


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/alignment")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", choices=("tiny", "demo"), default="tiny",
                        help="the demo config's tiny model (width 32, 1 layer) or its demo model (128, 4 layers)")
    parser.add_argument("--joint_images", type=arguments.positive_int, default=20)
    args, extra = parser.parse_known_args()
    _remember_relevance()
    suffix = "_tiny" if args.size == "tiny" else ""
    # The tiny config's data sizes are a smoke test's: the demo's 20k / 1k / 1k here.
    sizes = ["--config.data.num_train=20000", "--config.data.num_validation=1000", "--config.data.num_test=1000"]
    records = []
    for seed in args.seeds:
        for name in RUNS:
            spec = f"configs/demo_regions.py:{name}{suffix}"
            workdir = os.path.join(args.workdir, args.size, f"seed_{seed}", name)
            overrides = [*SETTINGS, *sizes, *extra, f"--config.seed={seed}", f"--config.data.data_dir={args.data_dir}"]
            trained = train_and_read_results(spec, workdir, args.data_dir, overrides)
            record = {"seed": seed, "train_seconds": trained["seconds"],
                      **evaluate_run(name, spec, workdir, overrides, args.joint_images)}
            records.append(record)
            print(json.dumps(record), flush=True)

    summary = {}
    for name, mode in (("towers", "towers"), ("teran", "late_interaction"), ("joint", "towers")):
        chosen = [r for r in records if r["run"] == name]
        summary[f"{name} by {mode}"] = {
            "mean_recall": mean_of(chosen, (mode, "mean_recall")),
            "text_to_image_R@1": mean_of(chosen, (mode, "text_to_image", "R@1")),
            "text_to_image_NDCG@25": mean_of(chosen, (mode, "text_to_image", "NDCG@25")),
            "image_to_text_NDCG@25": mean_of(chosen, (mode, "image_to_text", "NDCG@25")),
            "seconds": mean_of(chosen, (f"{mode}_seconds",)),
        }
    joint = [r for r in records if r["run"] == "joint"]
    summary["joint rerank top-20"] = {"mean_recall": mean_of(joint, ("joint_rerank_top20", "mean_recall")),
                                      "seconds": mean_of(joint, ("joint_rerank_top20", "seconds"))}
    summary["joint all pairs (extrapolated)"] = {"seconds": mean_of(joint, ("joint_all_pairs_seconds_extrapolated",))}
    print(json.dumps({"seeds": args.seeds, "size": args.size, "mean_and_std_over_seeds": summary}))


def mean_of(records, path):
    """(mean, population std) over `records` of the value at `path`, or None where absent."""
    values = []
    for record in records:
        value = record
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return [round(statistics.mean(values), 2), round(statistics.pstdev(values), 2)] if values else None


if __name__ == "__main__":
    arguments.run(main)
