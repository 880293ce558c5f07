"""Data: sources → records → rendered, tokenized, masked examples → rows (see pipeline.py)."""
