"""Continual cross-modal retrieval (`vlretrieval continual`, docs/continual.md): a sequence of
tasks trained one after another, every task's test gallery indexed when it is learnt, and the
recall matrix [task trained x task evaluated] under two indexing policies.

`protocol.py` reads the tasks and builds each task's config; `runner.py` trains and evaluates
the sequence; `results.py` turns the scores into matrices, forgetting, and the files.
"""
