"""4M after pretraining: fine-tuning on ImageNet-1K, ADE20K and NYUv2 (`transfer.py`; its data and augmentations in
`transfer_data.py`, `augment.py`, `pixel_ops.py`) and the out-of-the-box evaluation from RGB against the pseudo
labels (`evaluate.py`)."""
