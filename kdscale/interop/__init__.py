"""Reading and writing teacher outputs made by other tools (DistillKit, vLLM / axolotl)."""
