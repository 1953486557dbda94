"""Training augmentation seeded per (run seed, epoch, sample ``index``), so that it is resumable and order-free.

A plain MONAI ``Compose`` draws its random numbers from one stream that advances with every sample it
transforms: the flips of sample 40 depend on how many samples were transformed before it, in which thread
or worker, and whether the loader prefetched. After a resume from a checkpoint written mid-epoch, the
samples already trained on are skipped, so that stream would be at another position and the rest of the
epoch would see other augmentations than the uninterrupted run. ``SampleSeededCompose`` instead gives
every sample its own stream, seeded by ``(seed, epoch, index)``: the augmentation of a sample depends only
on those three numbers. The transforms are flattened so that ``CacheDataset`` caches everything up to the
first random transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ignite.engine import Engine, Events
from monai.transforms import Compose, Randomizable

from pipeline.names import Keys as Ours


class SampleSeededCompose(Compose):
    def __init__(self, transforms: Sequence, seed: int):
        super().__init__(Compose(list(transforms)).flatten().transforms)
        self.seed = int(seed) % 2**32
        self.epoch = 0
        self._random = [t for t in self.transforms if isinstance(t, Randomizable)]

    def attach(self, engine: Engine) -> None:
        """Follow ``engine``'s epoch: set at every EPOCH_STARTED, before the epoch's first sample is loaded."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._set_epoch)

    def _set_epoch(self, engine: Engine) -> None:
        self.epoch = engine.state.epoch

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        if isinstance(input_, dict) and Ours.INDEX in input_ and self._random:
            stream = np.random.RandomState([self.seed, int(self.epoch) % 2**32, int(input_[Ours.INDEX]) % 2**32])
            for transform in self._random:
                transform.set_random_state(state=stream)
        return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
