"""The demo on detector-region inputs: the demo scenes as region features (docs/regions.md).

Each scene's objects (and a background region or two) are regions: a box and a feature vector, as
a detector's bottom-up-attention features are for COCO and Flickr30K. Three ways to train:
  vlretrieval train --config configs/demo_regions.py --workdir workdir/regions          # joint + MRM
  vlretrieval train --config configs/demo_regions.py:towers --workdir workdir/regions_towers
  vlretrieval train --config configs/demo_regions.py:teran --workdir workdir/teran       # TERAN
`:tiny` (or `towers_tiny`, `teran_tiny`) are seconds-long smoke runs of the same.

- default: the joint (single-stream) model pre-trained on regions the Unicoder-VL / UNITER way:
  the towers' InfoNCE, image-text matching, masked language modelling and masked region modelling
  (feature regression and object classification of 15% of the regions);
- towers: the decomposed towers with InfoNCE only;
- teran: TERAN's word x region late interaction with the hardest-negative hinge, evaluated by late
  interaction (eval.mode=late_interaction).
"""

from vlretrieval.config import load_sibling_config

VARIANTS = ("joint", "towers", "teran")


def get_config(arg=None):
    variant, _, size = (arg or "joint").partition("_")
    if variant == "tiny":
        variant, size = "joint", "tiny"
    if variant not in VARIANTS or size not in ("", "tiny"):
        raise ValueError(f"unknown demo_regions argument {arg!r}; use one of {VARIANTS}, each optionally _tiny")
    config = load_sibling_config(__file__, "demo.py", size or None)
    config.data.name = "demo_regions"
    config.model.image_input = "regions"
    config.model.regions.classes = 5  # the demo's shapes: the region labels
    config.eval.metrics = ("recall", "rank", "mean_recall", "ndcg")
    if variant == "joint":
        config.objectives.image_text_matching = 1.0
        config.objectives.masked_language_model = 1.0
        config.objectives.masked_region_features = 1.0
        config.objectives.masked_region_classes = 1.0
        config.objectives.itm_sampling_temperature = 0.5
    elif variant == "teran":
        config.objectives.contrastive = 0.0
        config.objectives.late_interaction_hinge = 1.0
        config.objectives.hinge_margin = 0.2
        # Against every negative of the global batch (VSE0), not only the hardest (VSE++): from
        # random initialisation the hardest negative alone collapses every word and region state
        # to one direction (the loss sits at the margin; docs/regions.md), as VSE++ warns.
        config.objectives.hinge_top_k = config.train.get_ref("batch_size") - 1
        config.eval.mode = "late_interaction"
    if not size:
        config.train.batch_size = 64
        config.train.num_steps = 600
        config.train.checkpoint_every = 300
        config.optimizer.warmup_steps = 60
    return config
