"""Tiny models and synthetic data for the evaluation tests (CPU, seconds).

Images are 1x8x8 in [0, 1]: class 0 is brighter in the left half, class 1 in the right half (class 2, when
asked for, in the top half). A small CNN separates them perfectly after a few hundred Adam steps.
"""

from __future__ import annotations

import torch
from torch import nn


def toy_images(n: int, num_classes: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 0.2 + 0.1 * torch.rand(n, 1, 8, 8, generator=g)
    x[y == 0, :, :, :4] += 0.5
    x[y == 1, :, :, 4:] += 0.5
    if num_classes > 2:
        x[y == 2, :, :4, :] += 0.5
    return x.clamp(0, 1), y


class ToyCNN(nn.Module):
    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(8 * 4, num_classes)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def train_toy(x: torch.Tensor, y: torch.Tensor, num_classes: int = 2, steps: int = 300, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ToyCNN(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 32, **meta) -> list[dict]:
    """MONAI-style collated batches with ``index`` and metadata lists."""
    out = []
    for start in range(0, len(x), size):
        sl = slice(start, start + size)
        batch = {"image": x[sl], "label": y[sl], "index": torch.arange(len(x))[sl]}
        batch.update({k: list(v[sl]) for k, v in meta.items()})
        out.append(batch)
    return out


class Affine2(nn.Module):
    """Logits (0, w.x + b): the decision boundary is the hyperplane w.x + b = 0."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)
