"""Hugging Face <-> vlretrieval checkpoint conversion (`vlretrieval convert`, `--init_from hf:`).

rules.py (one tensor's name and layout), parts.py (tower rule tables and encoder configs),
architectures.py (each HF architecture), siglip.py (SigLIP's), positions.py (position tables for
other sizes), hf_in.py (read an HF folder), native.py (write and read our run folders), hf_out.py
(write an HF folder), initialise.py (start a run from converted weights).
"""
