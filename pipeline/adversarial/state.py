"""Per-sample state of IMA and DPAAT, keyed by the data dict's dense ``index`` (0..n-1).

The key is the training *sample* the data source enumerates: an image in 2D, a whole volume in 3D. 3D training
crops ``data.patches_per_volume`` random patches per volume (``RandCropByPosNegLabeld``) and every patch keeps
its volume's ``index``; MONAI's collate flattens them, so a batch holds ``batch_size`` volumes, i.e. all the
patches of each of its volumes, one row per patch. Every patch is attacked at its volume's radius
``eps[index]``, and several rows of one batch carry the same index. ``record`` then reduces them
deterministically, with ``scatter_reduce``:

* ``correct``: the volume is handled correctly only if all its patches are (min);
* ``found``: an adversarial example was found if any patch crossed (max);
* ``clean_loss`` / ``adv_loss``: mean over the patches;
* distances (:meth:`mean_by_index`): mean over the patches that crossed.

So the end-of-epoch update moves each volume's radius once, as one sample. A later batch of the same epoch
carrying an index again (a volume listed twice) overwrites that index's flags and losses.

Under DDP every rank records only the indices it saw; :meth:`sync_` combines the ranks with the same rule
(a sample seen on several ranks, as DistributedSampler's padding does: correct if correct on all of them,
found if found on any, floats averaged over the ranks that touched it), so every rank ends with identical
values and hence computes identical end-of-epoch updates.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist_

_FLOATS = ("dist", "clean_loss", "adv_loss")


class SampleState:
    def __init__(self, n: int, eps_init: float):
        self.n = n
        self.eps = torch.full((n,), float(eps_init))
        self.tau: float | None = None
        self.epoch = 0
        self.reset_epoch()

    # ---------------------------------------------------------------- per epoch
    def reset_epoch(self) -> None:
        """Clear the epoch's flags and losses; the running distance estimate restarts at each sample's radius
        (as the released IMA code does: a stale estimate would pull a radius towards half its distance)."""
        device = self.eps.device
        self.dist = self.eps.clone()
        self.found = torch.zeros(self.n, dtype=torch.bool, device=device)
        self.correct = torch.zeros(self.n, dtype=torch.bool, device=device)
        self.seen = torch.zeros(self.n, dtype=torch.bool, device=device)
        self.touched = torch.zeros(self.n, dtype=torch.bool, device=device)   # since the last sync_
        self.clean_loss = torch.full((self.n,), math.nan, device=device)
        self.adv_loss = torch.full((self.n,), math.nan, device=device)

    def to_(self, device: torch.device | str) -> SampleState:
        for key in self._tensor_keys():
            setattr(self, key, getattr(self, key).to(device))
        return self

    def _tensor_keys(self) -> tuple[str, ...]:
        return ("eps", "dist", "found", "correct", "seen", "touched", "clean_loss", "adv_loss")

    def record(self, index: torch.Tensor, *, correct: torch.Tensor | None = None,
               found: torch.Tensor | None = None, clean_loss: torch.Tensor | None = None,
               adv_loss: torch.Tensor | None = None) -> None:
        """Store one batch's per-row values at their indices (duplicate indices: see the module doc)."""
        index = index.reshape(-1).to(self.eps.device, torch.long)
        if correct is not None:
            self.correct.copy_(self._reduce(self.correct, index, correct, "amin"))
        if found is not None:
            self.found.copy_(self._reduce(self.found, index, found, "amax"))
        if clean_loss is not None:
            self.clean_loss.copy_(self._reduce(self.clean_loss, index, clean_loss, "mean"))
        if adv_loss is not None:
            self.adv_loss.copy_(self._reduce(self.adv_loss, index, adv_loss, "mean"))
        self.seen[index] = True
        self.touched[index] = True

    @staticmethod
    def _reduce(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor, how: str) -> torch.Tensor:
        values = values.detach().reshape(-1).to(target.device)
        base = target.float() if target.dtype == torch.bool else target
        out = base.scatter_reduce(0, index, values.to(base.dtype), how, include_self=False)
        return out.bool() if target.dtype == torch.bool else out

    def mean_by_index(self, index: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique indices with at least one masked row, mean of the masked rows' values per index)."""
        index = index.reshape(-1).to(self.eps.device, torch.long)
        mask = mask.reshape(-1).to(self.eps.device)
        values = values.detach().reshape(-1).to(self.eps.device, torch.float32)
        total = torch.zeros(self.n, device=self.eps.device).index_add_(0, index, torch.where(mask, values, 0.0))
        count = torch.zeros(self.n, device=self.eps.device).index_add_(0, index, mask.float())
        hit = (count > 0).nonzero().squeeze(1)
        self.touched[hit] = True
        return hit, total[hit] / count[hit]

    # ---------------------------------------------------------------- DDP
    def sync_(self) -> None:
        """Combine the ranks' updates since the last sync (rule in the module doc); no-op without DDP."""
        if not (dist_.is_available() and dist_.is_initialized()) or dist_.get_world_size() == 1:
            self.touched.zero_()
            return
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist_.get_backend() == "nccl" else torch.device("cpu")
        home = self.eps.device
        touched = self.touched.to(device)
        count = touched.float()
        dist_.all_reduce(count)
        anywhere = count > 0
        for key in _FLOATS:
            mine = getattr(self, key).to(device)
            total = torch.where(touched, mine, 0.0)
            dist_.all_reduce(total)
            setattr(self, key, torch.where(anywhere, total / count.clamp_min(1), mine).to(home))
        for key, keep_if in (("correct", True), ("found", False), ("seen", False)):
            mine = getattr(self, key).to(device)
            votes = (touched & (mine != keep_if)).float()   # correct: any False wins; found/seen: any True wins
            dist_.all_reduce(votes)
            value = torch.where(anywhere, torch.full_like(mine, keep_if) ^ (votes > 0), mine)
            setattr(self, key, value.to(home))
        self.touched = torch.zeros_like(self.touched)

    # ---------------------------------------------------------------- checkpoint and logging
    def state_dict(self) -> dict:
        out = {key: getattr(self, key).detach().cpu().clone() for key in self._tensor_keys()}
        out.update(n=self.n, tau=self.tau, epoch=self.epoch)
        return out

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"per-sample state is for {state['n']} samples, the training set has {self.n}")
        device = self.eps.device
        for key in self._tensor_keys():
            setattr(self, key, state[key].detach().clone().to(device))
        self.tau = None if state["tau"] is None else float(state["tau"])
        self.epoch = int(state["epoch"])

    def summary(self) -> dict[str, float]:
        """eps mean/percentiles/extremes over all samples, the epoch's found/correct fractions among the
        samples seen, and tau once set."""
        eps = self.eps.float().cpu()
        q = torch.quantile(eps, torch.tensor([0.1, 0.5, 0.9]))
        seen = self.seen.cpu()
        n_seen = max(int(seen.sum()), 1)
        out = {"eps_mean": float(eps.mean()), "eps_p10": float(q[0]), "eps_p50": float(q[1]),
               "eps_p90": float(q[2]), "eps_max": float(eps.max()), "eps_min": float(eps.min()),
               "found_frac": float((self.found.cpu() & seen).sum()) / n_seen,
               "correct_frac": float((self.correct.cpu() & seen).sum()) / n_seen}
        if self.tau is not None:
            out["tau"] = float(self.tau)
        return out
