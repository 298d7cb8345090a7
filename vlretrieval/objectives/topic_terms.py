"""TextTopicNet's term of the table (`terms.TERMS`): its loss and check functions.

- `topic_prediction`: the soft cross-entropy between the image tower's predicted topic distribution
  (the topic head, `model.head.num_topics`) and the LDA's topic distribution of the image's texts
  (`batch["topic_targets"]`, fitted by `vlretrieval/topics.py`; docs/topics.md). Logged beside it:
  `topic_prediction_kl`, the same minus the targets' entropy, KL(target || predicted), 0 at best.
The math: `losses.topic_cross_entropy`, a mean over the batch's rows (no collective: under jit
the rows of a sharded batch average like one array's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlretrieval import losses
from vlretrieval.errors import UserError


def topic_prediction(inputs):
    if "topic_targets" not in inputs.batch:
        raise ValueError("topic_prediction needs batch['topic_targets']: the trainer adds them when the term is on "
                         "(train.record_fields)")
    targets = inputs.batch["topic_targets"].astype(jnp.float32)
    value = losses.topic_cross_entropy(inputs.outputs["image_topic_logits"], targets)
    entropy = jnp.mean(jnp.sum(jax.scipy.special.entr(targets), axis=-1))  # -t log t, 0 at t = 0
    return value, {"topic_prediction_kl": value - entropy}


def check_topic_prediction(config, setting) -> None:
    if config.topic_prediction > 0 and not getattr(setting.model.head, "num_topics", 0):
        raise UserError("config.objectives.topic_prediction trains a topic head: set config.model.head.num_topics "
                        "(the number of LDA topics, e.g. 20)")
