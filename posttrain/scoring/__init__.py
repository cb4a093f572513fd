"""Scoring: generation, token loss, reward functions, pass@k and CIs (evaluation), plots, lm-eval tasks.

Import-free on purpose: `posttrain.config` imports `posttrain.scoring.rewards` (stdlib only) to check
reward names, and that must not pull in torch.
"""
