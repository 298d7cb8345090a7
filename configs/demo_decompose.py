"""Decomposes a pre-trained joint model into towers (VLDeformer) and trains them contrastively.

The towers start from the joint model's weights (`--init_from`), and train with composed bimodal
hard negatives: each caption with some content words swapped, each image with half of its
patches taken from another image of the batch, as extra contrastive columns.
  vlretrieval train --config configs/demo_decompose.py --workdir workdir/decomposed \\
      --init_from workdir/joint
`--config configs/demo_decompose.py:no_negatives` is the same run without composed negatives.
"""


from vlretrieval.config import load_sibling_config


def get_config(arg=None):
    variant = arg or "negatives"
    if variant not in ("negatives", "no_negatives", "tiny"):
        raise ValueError(f"unknown argument {arg!r}; use negatives, no_negatives or tiny")
    config = load_sibling_config(__file__, "demo.py", "tiny" if variant == "tiny" else None)
    composed = variant != "no_negatives"
    config.objectives.contrastive = 1.0
    config.objectives.composed_text_negatives = composed
    config.objectives.composed_image_negatives = composed
    config.objectives.text_swap_fraction = 0.3
    config.objectives.image_mix_fraction = 0.5
    if variant != "tiny":
        config.train.num_steps = 300
        config.train.checkpoint_every = 300
        config.optimizer.learning_rate = 1e-3
        config.optimizer.warmup_steps = 30
    return config
