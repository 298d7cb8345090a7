"""Teacher float mAP against distilled student codes at 16-128 bits, with and without joint teaching.

  python benchmarks/hashing.py [--workdir workdir/hashing] [--data_dir data] [--seeds 0 1 2]
                               [--bits 16 32 64 128] [--joint_teaching_bits 64] [--steps 300]
                               [--student_steps 1500] [--student='--config.key=value ...']

For each seed: a teacher (the demo's decomposed model, width 64, 2 layers) trained on the demo
scenes for `--steps`, then for each code length a smaller student (a dual encoder, width 32, 1
layer, with a hashing head of that many bits) distilled from it for `--student_steps` with the same
seed: the teacher's similarity structure (`distillation`), the same structure in the codes' signs
(`hash_distillation`, straight-through), the codes' pairwise similarity to the teacher's
(`hash_similarity`) and the quantisation term, beside the contrastive loss; at
`--joint_teaching_bits` also the same with a peer student (`distill.joint_teaching`, whose
refinement acts on `hash_similarity`'s targets). Evaluation on the demo test split (English): mAP
with each caption's image as its label, both directions, of the teacher's float embeddings and of
the students' sign codes (ranked by Hamming distance; ties to the lower gallery index). Prints one
JSON object per run, then per code length the mean over seeds and the ratio to the teacher's mAP.
For the search speed of codes against floats see benchmarks/hamming_search.py.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runs import train_and_read_results

from vlretrieval import arguments

COMMON = ["--config.data.num_train=4096", "--config.data.num_test=500", "--config.data.languages=('en',)",
          "--config.train.batch_size=64", "--config.optimizer.warmup_steps=30", "--config.eval.report=false",
          "--config.eval.metrics=('recall','mean_recall')", "--config.eval.batch_size=100"]
TEACHER = ["--config.model.transformer.width=64", "--config.model.transformer.depth=2",
           "--config.model.transformer.mlp_dim=128", "--config.model.head.embed_dim=64",
           "--config.optimizer.learning_rate=0.003"]


def student_settings(teacher: str, bits: int, joint_teaching: bool, steps: int) -> list[str]:
    """A dual encoder a quarter of the teacher's transformer width x depth (32 x 1 against 64 x 2),
    trained `steps` steps with distillation, the codes' structure distilled through their signs
    (straight-through), the codes' pairwise similarities and quantisation, beside InfoNCE."""
    return ["--config.model.kind=dual", f"--config.model.head.hash_bits={bits}", "--config.model.head.embed_dim=64",
            f"--config.distill.teacher={teacher}", f"--config.distill.joint_teaching={str(joint_teaching).lower()}",
            "--config.optimizer.learning_rate=0.003", f"--config.train.num_steps={steps}",
            f"--config.train.checkpoint_every={steps}", "--config.objectives.distillation=1.0",
            "--config.objectives.hash_distillation=5.0", "--config.objectives.hash_straight_through=true",
            "--config.objectives.hash_similarity=1.0", "--config.objectives.hash_quantization=0.1"]


def map_both_ways(config_spec: str, overrides: list[str], workdir: str, codes: bool) -> dict:
    """mAP (percent) text -> image and image -> text of the run's floats, or of its sign codes."""
    import jax
    import numpy as np

    from vlretrieval import parallel
    from vlretrieval.config import load_config
    from vlretrieval.data.pipeline import NormalizedImages
    from vlretrieval.evaluation import checkpoints
    from vlretrieval.evaluation.evaluate import embed_in_batches
    from vlretrieval.evaluation.metrics import average_precision

    config = load_config(config_spec, [o.removeprefix("--config.") for o in overrides])
    model, params, data, _ = checkpoints.restore_for_evaluation(config, workdir)
    mesh = parallel.make_mesh(1)
    split = checkpoints.evaluation_split(config, data)
    image_method = model.encode_image_codes if codes else model.encode_image
    text_method = model.encode_text_codes if codes else model.encode_text
    encode_image = jax.jit(lambda images: model.apply({"params": params}, images, method=image_method))
    encode_text = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask, method=text_method))
    images = embed_in_batches(encode_image, [NormalizedImages(split["images"])], 100, mesh)
    captions = split["captions"]["en"]
    texts = [caption for per_image in captions for caption in per_image]
    owners = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    token_ids, text_mask = data.tokenizer.encode(texts, config.data.max_text_length)
    text_vectors = embed_in_batches(encode_text, [token_ids, text_mask], 100, mesh)
    image_owners = np.arange(len(images))
    return {"text_to_image_mAP": round(average_precision(text_vectors, owners, images, image_owners)[0], 2),
            "image_to_text_mAP": round(average_precision(images, image_owners, text_vectors, owners)[0], 2)}


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/hashing")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--joint_teaching_bits", type=int, nargs="*", default=[64])
    parser.add_argument("--steps", type=arguments.positive_int, default=300, help="the teacher's steps")
    parser.add_argument("--student_steps", type=arguments.positive_int, default=1500,
                        help="the students' steps (docs/hashing.md: 2500 meets the 64-bit target both ways)")
    parser.add_argument("--student", default="",
                        help="more overrides for the students only, one string: --student='--config.a=1 --config.b=2'")
    args, extra = parser.parse_known_args()
    spec = "configs/demo.py:tiny"
    records = []
    for seed in args.seeds:
        base = [*COMMON, f"--config.train.num_steps={args.steps}", f"--config.train.checkpoint_every={args.steps}",
                f"--config.seed={seed}", f"--config.data.data_dir={args.data_dir}", *extra]
        teacher_dir = os.path.join(args.workdir, f"seed_{seed}", "teacher")
        teacher_overrides = [*base, *TEACHER]
        train_and_read_results(spec, teacher_dir, args.data_dir, teacher_overrides)
        teacher = {"seed": seed, "run": "teacher", **map_both_ways(spec, teacher_overrides, teacher_dir, codes=False)}
        records.append(teacher)
        print(json.dumps(teacher), flush=True)
        runs = [(bits, False) for bits in args.bits] + [(bits, True) for bits in args.joint_teaching_bits]
        for bits, joint in runs:
            name = f"codes{bits}" + ("_joint_teaching" if joint else "")
            workdir = os.path.join(args.workdir, f"seed_{seed}", name)
            overrides = [*base, *student_settings(teacher_dir, bits, joint, args.student_steps), *args.student.split()]
            trained = train_and_read_results(spec, workdir, args.data_dir, overrides)
            floats = map_both_ways(spec, overrides, workdir, codes=False)
            record = {"seed": seed, "run": name, "bits": bits, "joint_teaching": joint,
                      "train_seconds": trained["seconds"], **map_both_ways(spec, overrides, workdir, codes=True),
                      **{f"student_float_{key}": value for key, value in floats.items()}}
            for key in ("text_to_image_mAP", "image_to_text_mAP"):
                record[f"{key}_of_teacher"] = round(record[key] / max(teacher[key], 1e-9), 3)
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {}
    for name in dict.fromkeys(r["run"] for r in records):
        chosen = [r for r in records if r["run"] == name]
        summary[name] = {key: [round(statistics.mean(r[key] for r in chosen), 3),
                               round(statistics.pstdev(r[key] for r in chosen), 3)]
                         for key in chosen[0] if key.endswith("mAP") or key.endswith("of_teacher")}
    print(json.dumps({"seeds": args.seeds, "mean_and_std_over_seeds": summary}))


if __name__ == "__main__":
    arguments.run(main)
