"""DPT for surface normals: transformers' DPTForDepthEstimation with a 3-channel head, as Omnidata trains it.

The only difference from depth is the last 1x1 convolution of the head (32 -> 3 channels instead of 1), so
Omnidata's normal checkpoint maps onto it key by key; `num_output_channels` in config.json records it.
"""
from __future__ import annotations

from torch import nn
from transformers import DPTForDepthEstimation


class DPTForSurfaceNormals(DPTForDepthEstimation):
    def __init__(self, config):
        super().__init__(config)
        channels = getattr(config, "num_output_channels", 3)
        config.num_output_channels = channels
        last = self.head.head[-2]  # Conv2d(32, 1, 1) followed by ReLU
        self.head.head[-2] = nn.Conv2d(last.in_channels, channels, kernel_size=1)
        self.post_init()
