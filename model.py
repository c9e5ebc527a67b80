"""The PCAM classifier: a multilayer perceptron over flattened 96x96 RGB patches."""

import math

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Normalise, flatten, then Linear -> ReLU -> Dropout per hidden size, then a Linear to the logits.

    The per-channel mean and std the inputs are normalised with are buffers, so they travel with the
    weights in every checkpoint; the defaults (0, 1) leave inputs unchanged until set_normalization.
    The first Linear's weight columns are in (H, W, C) pixel order.
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

    def normalised_first_layer(self, centre=None):
        """The first Linear with the normalisation folded in: weight (out, H*W, C) and bias (out,), for inputs less
        centre (per channel; None: raw inputs).

        W @ ((x - mean) / std) + b == (W / std) @ (x - centre) + (b - (W / std) @ (mean - centre)): a pass over the
        weight (27,648 x 64) instead of over every batch, recomputed per call so gradients reach the weight.
        The fold runs in fp32 under any autocast: in bfloat16 the bias's sum over 9,216 pixels would carry its
        rounding into every logit.
        """
        first = self.layers[0]
        with torch.autocast(first.weight.device.type, enabled=False):
            scale = 1 / self.channel_std.flatten()
            weight = first.weight.view(first.out_features, -1, scale.numel()) * scale
            offset = self.channel_mean.flatten() - (0 if centre is None else centre)
            bias = first.bias - weight.sum(dim=1) @ offset
        return weight, bias

    def forward(self, images):
        """images (B, C, H, W), float or uint8, in the stored pixel scale (0..255) -> logits (B, num_classes).

        Under autocast the first layer's matmul runs in the low precision, its normalisation and bias in fp32;
        the later layers as autocast runs them. The matmul's inputs are the pixels less each channel's whole
        mean, exact integers in bfloat16 (|x| <= 255) whose sum stays near the normalised scale; raw 0..255
        pixels would sum to values bfloat16 rounds coarsely."""
        device_type = images.device.type
        low_precision = torch.is_autocast_enabled(device_type)
        centre = self.channel_mean.flatten().round() if low_precision else None
        weight, bias = self.normalised_first_layer(centre)
        if low_precision:
            images = images - centre.view(1, -1, 1, 1).to(torch.get_autocast_dtype(device_type))
        if images.is_contiguous():  # (B, C, H, W) in memory: reorder the weight's columns, not the batch
            pixels, weight = images.flatten(1), weight.transpose(1, 2)
        else:  # channels-last, as data.py yields: (H, W, C) order is a free view; any other layout, a copy
            pixels = images.permute(0, 2, 3, 1).reshape(len(images), -1)
        weight = weight.reshape(len(weight), -1)
        if low_precision:
            hidden = F.linear(pixels, weight).float() + bias
        else:  # one pass over the pixels: uint8 straight to fp32
            hidden = F.linear(pixels.to(weight.dtype), weight, bias)
        for layer in self.layers[1:]:
            hidden = layer(hidden)
        return hidden
