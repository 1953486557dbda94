"""Per-sample norm-ball geometry: radii, step directions, projection, random starts, distances.

All helpers work on any input shape ``(B, C, *spatial)`` (2D or 3D) and treat each sample separately; they
compute in float32.
"""

from __future__ import annotations

import math

import torch

NORMS = ("L2", "Linf")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def as_radius(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float or a ``(B,)`` tensor -> float32 ``(B,)`` on x's device."""
    r = torch.as_tensor(eps, dtype=torch.float32, device=x.device)
    return r.expand(x.shape[0]).clone() if r.dim() == 0 else r.reshape(x.shape[0]).float()


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable against x."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def size(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L2 or Linf norm, ``(B,)`` float32."""
    flat = v.float().flatten(1)
    return flat.norm(dim=1) if norm == "L2" else flat.abs().amax(dim=1)


def direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size: grad / ||grad||_2 per sample (L2) or sign(grad) (Linf)."""
    g = grad.float()
    if norm == "Linf":
        return g.sign()
    return g / per_sample(size(g, "L2").clamp_min(1e-12), g)


def project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project each sample's perturbation onto its own ball of radius eps[i]."""
    r = per_sample(eps, delta)
    if norm == "Linf":
        return torch.maximum(torch.minimum(delta, r), -r)
    factor = (eps / size(delta, "L2").clamp_min(1e-12)).clamp(max=1.0)
    return delta * per_sample(factor, delta)


def random_in_ball(x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """A perturbation drawn uniformly inside each sample's ball (L2: direction * eps * U^(1/d))."""
    if norm == "Linf":
        return (torch.rand_like(x, dtype=torch.float32) * 2 - 1) * per_sample(eps, x)
    d = math.prod(x.shape[1:])
    noise = torch.randn_like(x, dtype=torch.float32)
    noise = noise / per_sample(size(noise, "L2").clamp_min(1e-12), x)
    radius = eps * torch.rand_like(eps).pow(1.0 / d)
    return noise * per_sample(radius, x)


def clamp_range(x: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])
