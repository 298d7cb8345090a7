"""Training objectives composed from config: one loss function for every kind of run.

`terms.py` declares every term (its weight in `config.objectives`, its math, what it needs, its
checks); `compose.py` builds the objective's pieces from that table; `checks.py` refuses
objectives that cannot run before anything is built.
"""

from vlretrieval.objectives.checks import check_objectives
from vlretrieval.objectives.compose import Objective, make_objective, split_loss_rng
from vlretrieval.objectives.terms import TERMS, Term, TermInputs, mask_tokens

__all__ = [
    "TERMS", "Term", "TermInputs", "Objective", "check_objectives", "make_objective",
    "split_loss_rng", "mask_tokens",
]
