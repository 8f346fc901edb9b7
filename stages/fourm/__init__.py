"""Stage 5, 4M: the masking sampler (`masking.py`), the loader (`fourm_data.py`), pretraining on Ray Train (`pretrain.py`) and its pictures (`fourm_pictures.py`)."""
