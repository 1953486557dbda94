"""The white-noise baseline: a random perturbation of exactly the attack radius.

If a model loses accuracy to random noise of radius eps as fast as to PGD of radius eps, the attack is not
finding anything special; a robust-looking PGD curve far above the noise curve is the usual sanity check
in reverse (noise must be much weaker than PGD).
"""

from __future__ import annotations

import torch


def random_perturbation(x: torch.Tensor, eps: torch.Tensor, norm: str,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``delta`` with ``||delta_i|| = eps[i]`` per sample.

    L2: a direction drawn uniformly on the unit sphere (a normalised Gaussian) scaled to eps.
    Linf: a random corner of the cube, ``eps * sign`` with independent fair signs per element.
    """
    eps = eps.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if norm == "L2":
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        length = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
        return eps * direction / length.reshape(-1, *([1] * (x.dim() - 1)))
    if norm == "Linf":
        signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        return eps * signs
    raise ValueError(f"norm must be 'L2' or 'Linf', got {norm!r}")


def noisy(x: torch.Tensor, eps: torch.Tensor, norm: str, clamp: tuple[float, float] | None = None,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` plus random noise of radius eps, clamped to the valid intensity range when one is given."""
    out = x + random_perturbation(x, eps, norm, generator)
    return out.clamp(*clamp) if clamp is not None else out
