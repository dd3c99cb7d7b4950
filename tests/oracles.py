"""Brute-force oracles shared by the tests: explicit per-sample contributions."""
import torch
from torch import nn


def contributions(layer, x):
    """(N, c_out, c_in, L) explicit A_ci: the layer applied to input channel i alone, minus the bias.

    Zeroing the other channels (rather than unfolding) keeps this oracle independent of the
    implementation, padding modes included.
    """
    is_conv = isinstance(layer, nn.Conv2d)
    channel_axis = 1 if is_conv else -1
    bias_only = layer(torch.zeros_like(x))
    A = []
    for i in range(x.shape[channel_axis]):
        alone = torch.zeros_like(x)
        alone.select(channel_axis, i).copy_(x.select(channel_axis, i))
        y = layer(alone) - bias_only  # (N, c_out, H', W') or (N, [T,] c_out)
        A.append(y.flatten(2) if is_conv else y.reshape(len(x), -1, y.shape[-1]).transpose(1, 2))
    return torch.stack(A, dim=2)
