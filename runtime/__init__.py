"""kubellm inference runtime: model loading, paged KV cache, continuous batching, serving."""
