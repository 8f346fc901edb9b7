"""Stage 2, pseudo labels: rgb/ in, one folder per labelled modality out (`label.py`)."""
