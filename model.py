"""The PCAM classifier: a multilayer perceptron over flattened 96x96 RGB patches."""
import math

import torch
from torch import nn


class MLP(nn.Module):
    """Normalise, flatten, then Linear -> ReLU -> Dropout per hidden size, then a Linear to the logits.

    The per-channel mean and std the inputs are normalised with are buffers, so they travel with the
    weights in every checkpoint; the defaults (0, 1) leave inputs unchanged until set_normalization.
    """

    def __init__(self, input_shape=(3, 96, 96), hidden_units=(64, 32), num_classes=2, dropout_rate=0.2):
        super().__init__()
        channels = input_shape[0]
        self.register_buffer("channel_mean", torch.zeros(channels, 1, 1))
        self.register_buffer("channel_std", torch.ones(channels, 1, 1))
        layers, in_features = [], math.prod(input_shape)
        for width in hidden_units:
            layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout_rate)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def set_normalization(self, channel_mean, channel_std):
        self.channel_mean.copy_(torch.as_tensor(channel_mean, dtype=torch.float32).view(-1, 1, 1))
        self.channel_std.copy_(torch.as_tensor(channel_std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images):
        """images (B, C, H, W), float or uint8, in the stored pixel scale (0..255) -> logits (B, num_classes)."""
        # flatten in (H, W, C) order: a free view of the channels-last batches data.py yields, a copy for
        # contiguous (B, C, H, W) input; then normalise with per-pixel scale and shift in one pass
        pixels = images.permute(0, 2, 3, 1).flatten(1).float()
        pixels_per_channel = pixels.shape[1] // self.channel_mean.numel()
        scale = (1 / self.channel_std).flatten().repeat(pixels_per_channel)
        shift = (-self.channel_mean / self.channel_std).flatten().repeat(pixels_per_channel)
        return self.layers(torch.addcmul(shift, pixels, scale))
