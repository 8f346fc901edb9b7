"""Torch modules: the labeler wrappers, the modality tokenizers and the 4M model (added by later stages)."""
