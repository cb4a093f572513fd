"""Scoring with external harnesses (lm-evaluation-harness)."""
