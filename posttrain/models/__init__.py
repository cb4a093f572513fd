"""Models: build a tokenizer and model (from scratch or a base), LoRA adapters, one load/save dispatch, merging.

Import-free on purpose: import the submodule you need (`posttrain.models.loading`, ...).
"""
