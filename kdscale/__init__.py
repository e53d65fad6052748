"""kdscale: knowledge distillation at scale.

Run a teacher once into a durable Parquet logit cache, then train many students from it with
Ray Train + DeepSpeed, recording the lineage teacher -> cache -> student in MLflow.
"""

__version__ = "0.1.0"
