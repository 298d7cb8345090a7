"""Small model configs shared by the tests."""

import ml_collections

from configs.demo import transformer


def tiny_model_config(kind: str = "decomposed", pre_norm: bool = True) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.kind = kind
    config.image_size = 16
    config.patch_size = 8
    config.max_text_length = 12
    for name in ("transformer", "image_transformer", "text_transformer"):
        section = transformer(width=32, depth=2, heads=4)
        section.pre_norm = pre_norm
        config[name] = section
    config.head = ml_collections.ConfigDict(
        dict(embed_dim=16, text_pooling="mean", image_pooling="cls",
             initial_temperature=0.07, max_logit_scale=100.0)
    )
    return config
