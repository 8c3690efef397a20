"""Evaluations that run on real data here: each measures a scorer against a known truth."""
