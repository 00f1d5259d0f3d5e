"""Evaluation: quality against budget (visual tokens per image)."""
