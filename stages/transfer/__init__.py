"""4M after pretraining: fine-tuning on ImageNet-1K, ADE20K and NYUv2 (`transfer.py`, `transfer_data.py`) and the out-of-the-box evaluation from RGB against the pseudo labels (`evaluate.py`)."""
