"""Decomposed towers vs the joint model on the demo test gallery: speed and recall, side by side.

  python benchmarks/decomposition_speed.py --towers workdir/decomposed --joint workdir/joint

Times, in one process on the same device:
- towers: embed every image and caption of the gallery, similarity matrix, top-k both ways;
- joint: the ITM score of every (caption, image) pair. Scoring all 5,000,000 pairs takes hours on
  a CPU, so a measured number of pairs is timed and scaled up (labelled `extrapolated`);
- rerank: the towers, then the joint model on each query's K shortlisted candidates (measured
  pairs scaled to the full shortlist the same way).
Recall of each mode comes from `vlretrieval.evaluate` on the same images: towers on the whole
split, and all three modes on the first `--recall_images` images (joint mode is O(N^2)).
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlretrieval import (
    arguments,  # noqa: E402
    parallel,  # noqa: E402
)
from vlretrieval.checkpoint import Checkpointer, load_params  # noqa: E402
from vlretrieval.data import datasets, pipeline  # noqa: E402
from vlretrieval.evaluation import rerank  # noqa: E402
from vlretrieval.evaluation.evaluate import embed_in_batches, evaluate_split, subset  # noqa: E402
from vlretrieval.models import build_model, init_params  # noqa: E402


def _load(workdir: str, data_dir: str | None):
    """Model, params and data of a finished run, from the config saved with its checkpoint."""
    checkpointer = Checkpointer(workdir)
    step = checkpointer.latest_step()
    checkpointer.close()
    if step is None:
        raise SystemExit(f"error: no checkpoint in {workdir}")
    with open(os.path.join(workdir, "checkpoints", str(step), "config", "metadata")) as handle:
        saved = json.load(handle)
    import ml_collections

    config = ml_collections.ConfigDict(saved)
    if data_dir:
        config.data.data_dir = data_dir
    data = datasets.open_dataset(config.data, seed=config.seed)
    model = build_model(config.model, data.tokenizer.vocab_size)
    params = load_params(workdir, init_params(model, jax.random.PRNGKey(0)))
    return config, model, params, data


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towers", required=True, help="workdir of the decomposed (towers) run")
    parser.add_argument("--joint", required=True, help="workdir of the joint pre-training run")
    parser.add_argument("--data_dir", help="where the demo data lives (default: as in the run)")
    parser.add_argument("--language", default="en")
    parser.add_argument("--shortlist", type=arguments.positive_int, default=20)
    parser.add_argument("--timed_pairs", type=arguments.positive_int, default=4096, help="joint pairs actually timed")
    parser.add_argument("--recall_images", type=arguments.positive_int, default=100)
    parser.add_argument("--repeats", type=arguments.positive_int, default=3)
    parser.add_argument("--batch_size", type=arguments.positive_int, default=500)
    parser.add_argument("--pair_batch_size", type=arguments.positive_int, default=256)
    parser.add_argument(
        "--fusion_weights", default="0,2,5,10,20,50",
        help="rerank score-fusion weights tried on the validation split; the best is reported on test",
    )
    args = parser.parse_args()

    config, model, tower_params, data = _load(args.towers, args.data_dir)
    _, _, joint_params, _ = _load(args.joint, args.data_dir)
    mesh = parallel.make_mesh()
    split = pipeline.load_split(data.split("test"), [args.language], config.model.image_size)
    images = pipeline.normalize_images(split["images"])
    texts = [c for captions in split["captions"][args.language] for c in captions]
    token_ids, text_mask = data.tokenizer.encode(texts, config.data.max_text_length)
    num_images, num_texts = len(images), len(texts)
    replicated = parallel.replicate(tower_params, mesh)
    encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    encode_text = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=model.encode_text))
    top_k = jax.jit(lambda s: (jax.lax.top_k(s, 10)[1], jax.lax.top_k(s.T, 10)[1]))

    def tower_retrieval():
        image_embeddings = embed_in_batches(
            lambda x: encode_image(replicated, x), [images], args.batch_size, mesh
        )
        text_embeddings = embed_in_batches(
            lambda i, m: encode_text(replicated, i, m), [token_ids, text_mask], args.batch_size, mesh
        )
        jax.block_until_ready(top_k(text_embeddings @ image_embeddings.T))

    scorer = rerank.make_pair_scorer(model, joint_params, mesh, args.pair_batch_size)
    rng = np.random.default_rng(0)
    pair_texts = rng.integers(0, num_texts, args.timed_pairs)
    pair_images = rng.integers(0, num_images, args.timed_pairs)

    def timed_pairs():
        rerank.score_pairs(scorer, token_ids, text_mask, images, pair_texts, pair_images)

    towers_seconds = _median_seconds(tower_retrieval, args.repeats)
    pairs_seconds = _median_seconds(timed_pairs, args.repeats)
    seconds_per_pair = pairs_seconds / args.timed_pairs
    all_pairs = num_images * num_texts
    joint_seconds = seconds_per_pair * all_pairs
    rerank_pairs = (num_texts + num_images) * args.shortlist
    rerank_seconds = towers_seconds + seconds_per_pair * rerank_pairs

    def evaluate_mode(eval_split, mode, params, weight=0.0):
        results = evaluate_split(
            model, params, eval_split, data.tokenizer, mesh=mesh, batch_size=args.batch_size,
            max_text_length=config.data.max_text_length, mode=mode, shortlist_size=args.shortlist,
            pair_batch_size=args.pair_batch_size, joint_params=joint_params,
            rerank_tower_weight=weight,
        )
        return results["languages"][args.language]

    # The fusion weight is chosen on validation images, never on the test images it is reported on.
    validation = subset(
        pipeline.load_split(data.split("validation"), [args.language], config.model.image_size),
        args.recall_images,
    )
    weights = [float(w) for w in args.fusion_weights.split(",")]
    validation_recall = {
        w: evaluate_mode(validation, "rerank", tower_params, w)["mean_recall"] for w in weights
    }
    best_weight = max(weights, key=lambda w: (validation_recall[w], -w))
    recall_split = subset(split, args.recall_images)
    recall = {
        "towers": evaluate_mode(recall_split, "towers", tower_params),
        "joint": evaluate_mode(recall_split, "joint", joint_params),
        "rerank": evaluate_mode(recall_split, "rerank", tower_params),
        "rerank_fused": evaluate_mode(recall_split, "rerank", tower_params, best_weight),
    }
    full_towers = evaluate_split(
        model, tower_params, split, data.tokenizer, mesh=mesh, batch_size=args.batch_size,
        max_text_length=config.data.max_text_length,
    )["languages"][args.language]

    print(json.dumps({
        "device": str(jax.devices()[0].device_kind),
        "gallery": {"images": num_images, "captions": num_texts, "language": args.language},
        "towers_seconds": towers_seconds,
        "joint_all_pairs_seconds": joint_seconds,
        "joint_all_pairs_extrapolated": True,
        "joint_pairs_timed": args.timed_pairs,
        "joint_seconds_per_pair": seconds_per_pair,
        "rerank_seconds": rerank_seconds,
        "rerank_shortlist": args.shortlist,
        "rerank_extrapolated": True,
        "speedup_towers_vs_joint": joint_seconds / towers_seconds,
        "speedup_rerank_vs_joint": joint_seconds / rerank_seconds,
        "recall_images": args.recall_images,
        "rerank_fusion_weight_chosen_on_validation": best_weight,
        "validation_mean_recall_by_fusion_weight": validation_recall,
        "recall_on_subset": {
            mode: {"mean_recall": r["mean_recall"], "text_to_image_R@1": r["text_to_image"]["R@1"],
                   "image_to_text_R@1": r["image_to_text"]["R@1"]}
            for mode, r in recall.items()
        },
        "towers_full_split": {"mean_recall": full_towers["mean_recall"],
                              "text_to_image_R@1": full_towers["text_to_image"]["R@1"],
                              "image_to_text_R@1": full_towers["image_to_text"]["R@1"]},
    }, indent=2))


if __name__ == "__main__":
    arguments.run(main)
