"""Training: TrainingJob + run_training (job), TRL config mapping, data, callbacks, checkpoints, outputs.

Import-free on purpose: import the submodule you need (`posttrain.training.job`, ...).
"""
