"""Tracking: the MLflow connection (client), runs, the model registry with promotion rules, model cards.

Import-free on purpose: import the submodule you need; mlflow itself is imported inside functions.
"""
