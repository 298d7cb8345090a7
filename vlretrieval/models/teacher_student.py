"""A student trained beside a frozen teacher (and a peer student): one module, one set of params.

`TeacherStudent` holds the student (`params["student"]`, any tower model), the teacher
(`params["teacher"]`, frozen by the optimizer: `distillation.FROZEN`) and optionally a peer
student of the student's architecture (`params["peer"]`, joint teaching, docs/hashing.md). It
exposes the student's tower interface, so the objective terms run on it as on any model, and its
`__call__` adds what the teacher terms read: the teacher's embeddings of the same batch
(`teacher_image_embeddings`, `teacher_text_embeddings`, no gradient) and the peer's hashing-head
outputs (`peer_image_hash_logits`, `peer_text_hash_logits`). Evaluation uses the student alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlretrieval.models.towers import l2_normalize


class TeacherStudent(nn.Module):
    student: nn.Module
    teacher: nn.Module
    peer: nn.Module | None = None
    # Which teacher towers the terms read ("image", "text"), and how: "projected" (the teacher's
    # own embeddings) or "pooled" (its pooled output, L2-normalised: a converted single tower
    # whose projection was never trained, e.g. a sentence-transformers text model).
    teacher_towers: tuple[str, ...] = ("image", "text")
    teacher_embeddings: str = "projected"
    teacher_image_size: int = 0  # the teacher's pixel size when it differs from the student's (0: same)

    def _teacher_images(self, images: jax.Array) -> jax.Array:
        size = self.teacher_image_size
        if not size or images.ndim != 4 or images.shape[1:3] == (size, size):
            return images
        return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")

    def teacher_image_embeddings(self, images: jax.Array) -> jax.Array:
        images = self._teacher_images(images)
        if self.teacher_embeddings == "projected":
            embeddings = self.teacher.encode_image(images)
        else:
            sequence = self.teacher.image_sequence(images)
            mask = self.teacher.image_mask(images, sequence.shape[1])
            embeddings = l2_normalize(self.teacher.pool_image(sequence, mask=mask))
        return jax.lax.stop_gradient(embeddings.astype(jnp.float32))

    def teacher_text_embeddings(self, token_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
        if self.teacher_embeddings == "projected":
            embeddings = self.teacher.encode_text(token_ids, text_mask)
        else:
            embeddings = l2_normalize(self.teacher.pool_text(self.teacher.text_sequence(token_ids, text_mask),
                                                             text_mask))
        return jax.lax.stop_gradient(embeddings.astype(jnp.float32))

    # The student's tower interface.

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.student.encode_image(images, train=train)

    def encode_text(self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False) -> jax.Array:
        return self.student.encode_text(token_ids, text_mask, train=train)

    def encode_image_codes(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.student.encode_image_codes(images, train=train)

    def encode_text_codes(self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False) -> jax.Array:
        return self.student.encode_text_codes(token_ids, text_mask, train=train)

    def joint_forward(self, token_ids, text_mask, images, *, train: bool = False, mask_regions=None):
        return self.student.joint_forward(token_ids, text_mask, images, train=train, mask_regions=mask_regions)

    def __call__(
        self, images: jax.Array, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False,
        sequences: bool = False,
    ) -> dict[str, jax.Array]:
        """The student's outputs, the teacher's embeddings of the batch (teacher in inference
        mode: no dropout) and the peer's hashing outputs."""
        outputs = dict(self.student(images, token_ids, text_mask, train=train, sequences=sequences))
        if "image" in self.teacher_towers:
            outputs["teacher_image_embeddings"] = self.teacher_image_embeddings(images)
        if "text" in self.teacher_towers:
            outputs["teacher_text_embeddings"] = self.teacher_text_embeddings(token_ids, text_mask)
        if self.peer is not None:
            peer = self.peer(images, token_ids, text_mask, train=train)
            outputs["peer_image_hash_logits"] = peer["image_hash_logits"]
            outputs["peer_text_hash_logits"] = peer["text_hash_logits"]
        return outputs

    def initialize(self, images: jax.Array, token_ids: jax.Array, text_mask: jax.Array) -> dict[str, jax.Array]:
        """Creates every parameter of the three models (the teacher's are replaced by its own)."""
        self.student.initialize(images, token_ids, text_mask)
        self.teacher.initialize(self._teacher_images(images), token_ids, text_mask)
        if self.peer is not None:
            self.peer.initialize(images, token_ids, text_mask)
        return self(images, token_ids, text_mask)
