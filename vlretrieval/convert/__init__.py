"""Hugging Face <-> vlretrieval checkpoint conversion (`vlretrieval convert`, `--init_from hf:`).

rules.py (one tensor's name and layout), architectures.py (each HF architecture), positions.py
(position tables for other sizes), hf_in.py (read an HF folder), native.py (write and read our run folders),
hf_out.py (write an HF folder), initialise.py (start a run from converted weights).
"""
