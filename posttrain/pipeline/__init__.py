"""The process layer: the stage entry point, the DVC DAG reader, the workspace lock, launch, the CLI.

Import-free on purpose: `posttrain.pipeline.cli` must answer `--help` in about a second.
"""
