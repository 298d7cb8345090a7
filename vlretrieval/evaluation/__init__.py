"""Evaluation: metrics, on-device search, joint re-ranking, saved indexes and their commands,
reports, and evaluating a run's checkpoints (`checkpoints.py`)."""
