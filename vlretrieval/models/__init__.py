"""Vision-language models: pure Flax linen modules that know nothing of devices, data or losses."""

from vlretrieval.models.factory import build_model, image_shape, init_params

__all__ = ["build_model", "image_shape", "init_params"]
