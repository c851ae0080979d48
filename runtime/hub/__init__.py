"""Models by name or path: the local model cache, hf:// downloads and the embedded default model."""
