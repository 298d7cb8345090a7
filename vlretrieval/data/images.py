"""Image preprocessing for the input pipeline: decode encoded bytes, crop, resize, normalise.

Training takes a random resized crop (Inception-style: a random area fraction and aspect ratio,
then resized to the model's square input); evaluation resizes the shorter side and takes the
centre square (CLIP's eval transform). Images that are already decoded arrays of the model's size
(the generated demo set) pass through unchanged.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

# CLIP's and big_vision's choice for the final resize of a crop.
_RESAMPLE = Image.Resampling.BICUBIC


def decode(data: bytes, draft_size: int | None = None) -> Image.Image:
    """RGB image from encoded bytes. With `draft_size`, a JPEG is decoded at the smallest power-of-
    two reduction that keeps both sides >= draft_size: several times faster for large photos."""
    image = Image.open(io.BytesIO(data))
    if draft_size:
        image.draft("RGB", (draft_size, draft_size))
    return image.convert("RGB")


def random_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a random fraction `scale` of the area with a
    log-uniform aspect ratio in `ratio`; the centre square if no draw fits (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def train_image(
    data: bytes, size: int, rng: np.random.Generator, scale: Sequence[float] = (0.5, 1.0)
) -> np.ndarray:
    """uint8 [size, size, 3]: a random resized crop of the encoded image."""
    # Draft large enough that the smallest allowed crop still has `size` pixels across.
    image = decode(data, draft_size=int(math.ceil(size / math.sqrt(scale[0]))))
    box = random_crop_box(image.width, image.height, rng, scale)
    return np.asarray(image.resize((size, size), _RESAMPLE, box=box), np.uint8)


def eval_image(data: bytes, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: shorter side resized to `size`, then the centre square."""
    image = decode(data, draft_size=size)
    shorter = min(image.width, image.height)
    width, height = round(image.width * size / shorter), round(image.height * size / shorter)
    left, top = (width - size) // 2, (height - size) // 2
    resized = image.resize((max(width, size), max(height, size)), _RESAMPLE)
    return np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)


def is_encoded(value) -> bool:
    return isinstance(value, (bytes, bytearray))


def model_image(value, size: int, rng: np.random.Generator | None = None,
                scale: Sequence[float] = (0.5, 1.0)) -> np.ndarray:
    """A record's image as the model's uint8 input: encoded bytes are decoded (a random crop with
    `rng`, the eval transform without); decoded arrays must already be `size` x `size`. Packed
    detector regions (`models.regions`: a 2-d float array) pass through as they are: there are no
    pixels to crop."""
    if is_encoded(value):
        return eval_image(value, size) if rng is None else train_image(value, size, rng, scale)
    array = np.asarray(value)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
        return array
    if array.shape[:2] != (size, size):
        raise ValueError(
            f"a decoded image of shape {array.shape} does not match the model's image size {size}"
        )
    return array


def normalize_images(
    images: np.ndarray,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """uint8 [0, 255] -> float32 (x / 255 - mean) / std per channel; the defaults give [-1, 1],
    the range the patch embedding is initialised for (converted CLIP models use CLIP's). Float
    input (packed detector regions) is the model's input already: only cast to float32."""
    if np.issubdtype(np.asarray(images).dtype, np.floating):
        return np.asarray(images, np.float32)
    mean = 255.0 * np.asarray(mean, np.float32)
    return (images.astype(np.float32) - mean) / (255.0 * np.asarray(std, np.float32))
