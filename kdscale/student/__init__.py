"""Student training: losses, DeepSpeed engine, Ray Train loop and driver, evaluation and export."""
