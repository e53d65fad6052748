"""Experiment tracking and lineage (MLflow)."""
