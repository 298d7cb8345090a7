"""Pre-trains the joint (early-interaction) model on the demo data (Unicoder-VL/VinVL style).

Objectives: image-text matching with negatives drawn from the batch by contrastive similarity,
masked language modelling with the image as context, and the towers' InfoNCE (which both trains
the shared weights and supplies the similarities the ITM negatives are drawn from).
  vlretrieval train --config configs/demo_joint.py --workdir workdir/joint
Then decompose: configs/demo_decompose.py.
"""


from vlretrieval.config import load_sibling_config


def get_config(arg=None):
    config = load_sibling_config(__file__, "demo.py", arg)
    config.objectives.contrastive = 1.0
    config.objectives.image_text_matching = 1.0
    config.objectives.masked_language_model = 1.0
    # Sample ITM negatives from softmax(cosine / 0.5): harder than random, but not only the
    # near-duplicates that the learned temperature (~1/20) picks, which stall a fresh ITM head.
    config.objectives.itm_sampling_temperature = 0.5
    if arg is None:
        config.train.batch_size = 64
        config.train.num_steps = 600
        config.train.checkpoint_every = 300
        config.optimizer.warmup_steps = 60
        # The joint model is scored pair by pair: evaluate it on the first 100 test images (500
        # captions per language) and English only; towers mode covers the whole split.
        config.eval.max_images = 100
    return config
