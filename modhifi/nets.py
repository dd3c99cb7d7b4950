"""The zoo's own architectures: a small ResNet, a VGG-style CNN, a small ViT and a tiny CNN.

Every prunable layer is a plain `nn.Conv2d` or `nn.Linear` so that input statistics (fidelity.py)
and structural surgery (prune.py, via Torch-Pruning) see them directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int, *, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, stride=stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: stem, one stage per width (the first of each later stage halves H, W)."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0]), nn.ReLU())
        layers, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                layers.append(BasicBlock(c_in, width, stride=2 if stage and not block else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def vgg(*, in_channels: int = 1, num_classes: int = 10,
        stages: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64), (128, 128))) -> nn.Sequential:
    """VGG-style: stages of conv-BN-ReLU, max-pool between stages, global pool, linear head."""
    layers, c_in = [], in_channels
    for stage in stages:
        for width in stage:
            layers += [*_conv_bn(c_in, width), nn.ReLU()]
            c_in = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


def tiny_cnn(*, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Two conv-BN-ReLU layers and a linear head, for 8x8 digits and fast tests."""
    return nn.Sequential(*_conv_bn(in_channels, 16), nn.ReLU(), *_conv_bn(16, 32), nn.ReLU(),
                         nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))


class Attention(nn.Module):
    """Multi-head self-attention with plain Linear projections (prunable, hookable)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3D) -> 3 x (B, heads, T, D/heads)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)  # unbound, not iterated: TorchScript's tracer follows it
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """The FFN whose hidden neurons ModHiFi prunes: fc1 -> GELU -> fc2 (fc2's inputs)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm Transformer block with residual additions."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.ffn = nn.LayerNorm(dim), FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding, class token, pre-LN blocks, linear head."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 patch: int = 4, dim: int = 96, depth: int = 4, heads: int = 4, hidden: int = 192):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, T, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])
