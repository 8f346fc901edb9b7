"""Stage 1, download: URL lists in, rgb/ and caption/ shards out (`download.py`; `inputs.py` reads the lists, `fetch.py` does the HTTP, `images.py` decodes and resizes)."""
