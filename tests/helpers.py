"""Small models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class LinearNet(nn.Module):
    """A linear classifier on flattened inputs: logits = W x + b."""

    def __init__(self, in_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(in_features, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, in_features, generator=gen))
            self.fc.bias.copy_(torch.randn(num_classes, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class TinyCNN(nn.Module):
    """Conv + BatchNorm + dropout: has train/eval-dependent behaviour to check mode handling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))
