"""The Parquet logit cache: format, target extraction, writing (shards then manifest) and reading."""
