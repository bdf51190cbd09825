"""Evaluation: the deterministic shapes-world detector and GenEval-style scoring."""
