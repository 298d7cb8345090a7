"""Position tables for another input size: text tables cut, image grids interpolated.

A text table longer than needed is cut exactly (positions past the text length are never read).
An image grid for another image size is resized bilinearly on its 2-D layout, the class token's
row (where there is one: SigLIP has none) kept as it is: the usual way to fine-tune a ViT at
another resolution. It is an approximation: the model's outputs at the new size are not those of
any HF forward.
"""

from __future__ import annotations

import math

import numpy as np

from vlretrieval.errors import UserError

TEXT_POSITIONS = ("text_encoder/embeddings/position", "joint/text_embeddings/position")
IMAGE_POSITIONS = ("image_encoder/embeddings/position", "joint/image_embeddings/position")


def interpolate_grid(table: np.ndarray, new_grid: int, class_token: bool = True) -> np.ndarray:
    """[1 + g*g, width] (class token first) -> [1 + new_grid**2, width]; without a class token
    [g*g, width] -> [new_grid**2, width]."""
    import jax
    import jax.numpy as jnp

    first = 1 if class_token else 0
    grid = math.isqrt(table.shape[0] - first)
    if grid * grid != table.shape[0] - first:
        raise UserError(f"an image position table of {table.shape[0]} rows is not a square grid")
    if grid == new_grid:
        return table
    patches = table[first:].reshape(grid, grid, table.shape[1])
    resized = jax.image.resize(
        jnp.asarray(patches), (new_grid, new_grid, table.shape[1]), method="linear", antialias=False
    )
    return np.concatenate([table[:first], np.asarray(resized).reshape(-1, table.shape[1])])


def resize(converted, *, image_size: int | None = None, max_text_length: int | None = None):
    """`converted` (hf_in.Converted) with its position tables fitted to the given sizes."""
    params, model = converted.params, converted.model
    if max_text_length is not None:
        for path in TEXT_POSITIONS:
            if path in params:
                length = params[path].shape[0]
                if max_text_length > length:
                    raise UserError(
                        f"{converted.architecture} has {length} text positions; a max_text_length "
                        f"of {max_text_length} needs more (use at most {length})"
                    )
                if max_text_length < length:
                    params[path] = params[path][:max_text_length]
                    converted.notes.append(
                        f"text positions cut from {length} to {max_text_length}"
                    )
        model["max_text_length"] = max_text_length
    if image_size is not None:
        patch = model["patch_size"]
        if image_size % patch:
            raise UserError(f"image size {image_size} is not a multiple of the patch size {patch}")
        for path in IMAGE_POSITIONS:
            if path in params and model["image_size"] != image_size:
                # The joint model's patches always have a class token; a tower's may not.
                class_token = (path.startswith("joint/")
                               or model.get("image_embeddings", {}).get("class_token", True))
                params[path] = interpolate_grid(params[path], image_size // patch, class_token)
                converted.notes.append(
                    f"image positions interpolated from {model['image_size']} to {image_size} pixels"
                )
        model["image_size"] = image_size
    return converted
