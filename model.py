"""The PCAM classifier: a multilayer perceptron over flattened 96x96 RGB patches."""

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def fold(weight, bias, scale, offset, row_width):
    """The normalisation folded into the first Linear: (weight * scale per channel, as (out, H*W, C); bias less the
    scaled weight's dot with offset). The scale is applied along whole rows of pixels (row_width columns), not as a
    3-wide vector, which the CPU broadcasts several times slower; the products are the same."""
    channels = scale.numel()
    scaled = weight.view(len(weight), -1, row_width) * scale.repeat(row_width // channels)
    scaled = scaled.view(len(weight), -1, channels)
    return scaled, bias - scaled.sum(dim=1) @ offset


class FoldedLinear(torch.autograd.Function):
    """F.linear of the pixels (B, H*W*C) as floats with the folded weight and bias, and its backward written out.
    The gradients are autograd's, bit for bit, but taken in place along whole rows: autograd's own allocate a fresh
    7 MiB weight gradient at each step of the fold and broadcast 3-wide channel vectors. The folded weight is kept
    for backward only when the pixels need a gradient (a saliency map), not for uint8 training batches."""

    @staticmethod
    def forward(ctx, pixels, weight, bias, scale, offset, row_width):
        scaled, scaled_bias = fold(weight, bias, scale, offset, row_width)
        inputs = pixels.to(weight.dtype)  # one contiguous pass, uint8 straight to fp32
        scaled = scaled.view(len(weight), -1)
        ctx.save_for_backward(inputs, scale, offset, scaled if ctx.needs_input_grad[0] else None)
        ctx.row_width, ctx.pixels_dtype = row_width, pixels.dtype
        return F.linear(inputs, scaled, scaled_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        inputs, scale, offset, scaled = ctx.saved_tensors
        grad_pixels = None if scaled is None else grad.mm(scaled).to(ctx.pixels_dtype)
        grad_bias = grad.sum(0)
        grad_weight = grad.t().mm(inputs)  # (out, H*W*C), as addmm's backward computes it
        rows, repeats = grad_weight.view(len(grad_weight), -1, ctx.row_width), ctx.row_width // scale.numel()
        rows.add_((-grad_bias).outer(offset).repeat(1, repeats).unsqueeze(1))  # the folded bias's share
        rows.mul_(scale.repeat(repeats))
        return grad_pixels, grad_weight, grad_bias, None, None, None


class MLP(nn.Module):
    """Normalise, flatten, then Linear -> ReLU -> Dropout per hidden size, then a Linear to the logits.

    The per-channel mean and std the inputs are normalised with are buffers, so they travel with the
    weights in every checkpoint; the defaults (0, 1) leave inputs unchanged until set_normalization.
    The first Linear's weight columns are in (H, W, C) pixel order.
    """

    def __init__(self, input_shape=(3, 96, 96), hidden_units=(64, 32), num_classes=2, dropout_rate=0.2):
        super().__init__()
        channels = input_shape[0]
        self.row_width = channels * input_shape[2]  # the first weight's columns of one row of pixels
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
            offset = self.channel_mean.flatten() - (0 if centre is None else centre)
            return fold(first.weight, first.bias, 1 / self.channel_std.flatten(), offset, self.row_width)

    def forward(self, images):
        """images (B, C, H, W), float or uint8, in the stored pixel scale (0..255) -> logits (B, num_classes).

        Under autocast the first layer's matmul runs in the low precision, its normalisation and bias in fp32;
        the later layers as autocast runs them. The matmul's inputs are the pixels less each channel's whole
        mean, exact integers in bfloat16 (|x| <= 255) whose sum stays near the normalised scale; raw 0..255
        pixels would sum to values bfloat16 rounds coarsely."""
        if torch.is_autocast_enabled(images.device.type) or images.is_contiguous():
            hidden = self.first_layer_by_autograd(images)
        else:  # channels-last, as data.py yields: (H, W, C) order is a free view; any other layout, a copy
            pixels, first = images.permute(0, 2, 3, 1).reshape(len(images), -1), self.layers[0]
            scale, offset = 1 / self.channel_std.flatten(), self.channel_mean.flatten()
            hidden = FoldedLinear.apply(pixels, first.weight, first.bias, scale, offset, self.row_width)
        for layer in self.layers[1:]:
            hidden = layer(hidden)
        return hidden

    def first_layer_by_autograd(self, images):
        """The first layer under autocast, or on contiguous (B, C, H, W) input, whose weight columns are reordered
        instead of the batch."""
        device_type = images.device.type
        low_precision = torch.is_autocast_enabled(device_type)
        centre = self.channel_mean.flatten().round() if low_precision else None
        weight, bias = self.normalised_first_layer(centre)
        if low_precision:
            images = images - centre.view(1, -1, 1, 1).to(torch.get_autocast_dtype(device_type))
        if images.is_contiguous():  # (B, C, H, W) in memory: reorder the weight's columns, not the batch
            pixels, weight = images.flatten(1), weight.transpose(1, 2)
        else:  # channels-last: (H, W, C) order is a free view
            pixels = images.permute(0, 2, 3, 1).reshape(len(images), -1)
        weight = weight.reshape(len(weight), -1)
        if low_precision:
            return F.linear(pixels, weight).float() + bias
        return F.linear(pixels.to(weight.dtype), weight, bias)
