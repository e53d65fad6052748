"""Corpus ingestion: reading, tokenizing and packing text into fixed-length training sequences."""
