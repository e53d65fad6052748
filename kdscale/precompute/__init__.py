"""Precompute stage: run the teacher once over the corpus and write its soft targets to the cache."""
