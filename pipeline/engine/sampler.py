"""The training sampler: the order of epoch e depends only on (seed, e), so a resumed run sees the same batches.

It is torch's ``DistributedSampler`` (one replica outside ``torchrun``), whose epoch MONAI's workflow sets at
every EPOCH_STARTED, plus ``skip_once``: after a resume from a checkpoint written mid-epoch, the samples the
interrupted run already trained on in that epoch are skipped, once.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from pipeline.engine import distributed as dist


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=shuffle, seed=seed,
                         drop_last=False)
        self._skip = 0

    def skip_once(self, n_samples: int) -> None:
        self._skip = max(0, int(n_samples))

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(order[skip:])
