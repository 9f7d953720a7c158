"""KV-cache policies: which entries each layer and head keeps, or attends to."""
