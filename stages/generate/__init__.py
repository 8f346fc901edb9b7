"""Any-to-any generation with a 4M model: requests in, samples (tokens, pictures, texts) out (`generate.py`)."""
