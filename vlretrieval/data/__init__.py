"""Datasets, tokenizers and input pipelines."""
