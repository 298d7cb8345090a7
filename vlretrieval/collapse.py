"""Collapse: a contrastive run whose loss sits at its chance value with almost no gradient.

InfoNCE over a batch of B pairs is ln(B) when every pair scores alike (the towers give one vector
for everything, or a temperature so high that the logits are flat), and then its gradient is ~0:
nothing moves and recall stays at chance to the end of the run. Seen when pretrained weights meet
a from-scratch learning rate, or with a very high initial temperature. A healthy run leaves ln(B)
within its first tens of steps, with gradient norms of order 1 (the demo's: 6 to 30).
"""

from __future__ import annotations

import math

import ml_collections

from vlretrieval.errors import UserError

# Within this fraction of ln(B), with a gradient norm below GRADIENT_NORM, for PATIENCE logged
# steps in a row.
LOSS_MARGIN = 0.02
GRADIENT_NORM = 0.1
PATIENCE = 3


class RunCollapsed(UserError):
    """`train.stop_on_collapse`: the run sat at chance."""


class CollapseWatch:
    """Watches the logged metrics; warns once (or, with `train.stop_on_collapse`, stops)."""

    def __init__(self, config: ml_collections.ConfigDict):
        objectives = config.objectives
        # The chance value is ln(B) for the softmax term without composed negatives (which add
        # columns); other objectives have no single chance value, and are not watched.
        self.watched = (
            objectives.contrastive > 0 and objectives.contrastive_loss == "softmax"
            and not objectives.composed_text_negatives and not objectives.composed_image_negatives
        )
        self.chance = math.log(config.train.batch_size)
        self.stop = config.train.stop_on_collapse
        self.streak, self.warned = 0, False

    def observe(self, step: int, metrics: dict[str, float]) -> str | None:
        """The warning to log, once, when the run has sat at chance for PATIENCE logged steps."""
        if not self.watched or "contrastive_loss" not in metrics:
            return None
        at_chance = abs(metrics["contrastive_loss"] - self.chance) <= LOSS_MARGIN * self.chance
        flat = metrics.get("gradient_norm", math.inf) < GRADIENT_NORM
        self.streak = self.streak + 1 if at_chance and flat else 0
        if self.streak < PATIENCE or self.warned:
            return None
        self.warned = True
        message = (
            f"the contrastive loss has been at its chance value ln({round(math.exp(self.chance))}) = "
            f"{self.chance:.3f} with gradient norm {metrics['gradient_norm']:.3g} for {PATIENCE} logged "
            f"steps (step {step}): the run has collapsed and will stay at chance recall. Likely causes: a "
            "learning rate too high for pretrained weights (config.optimizer.learning_rate), a temperature "
            "too high (config.model.head.initial_temperature), or frozen towers"
        )
        if self.stop:
            raise RunCollapsed(message + " (config.train.stop_on_collapse)")
        return message
