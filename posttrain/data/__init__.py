"""The data layer: synthetic domains and user sources, splits, decontamination and mixing.

Kept import-free on purpose: `posttrain.config` imports `posttrain.data.domains` (stdlib only) to
check verifier names, and must stay cheap. Import the submodules you need.
"""
