"""Prefect flows that execute the DAG dvc.yaml declares (no training logic here)."""
