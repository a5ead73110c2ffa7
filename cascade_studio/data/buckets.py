"""Aspect-ratio buckets at (about) constant area, and a batch sampler that keeps each batch in one bucket.

Sides are multiples of 32 because Stage C's semantic compressor has stride 32: every bucket maps to a whole
latent grid. Keeping the area constant keeps the token count, and so memory and step time, about the same
for every bucket (the habit of kohya sd-scripts and OneTrainer).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def make_buckets(resolution: int, step: int = 32, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes (height, width), multiples of `step`, with h*w as close to resolution**2 as the step allows.

    The square (resolution, resolution) is always included; every bucket's transpose is included too; the
    long/short ratio never exceeds `max_ratio`. Sorted by aspect ratio h/w (tallest last).
    """
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    for short in range(step, resolution + 1, step):
        # Nearest multiple of step to the ideal long side: the area error is at most short*step/2.
        long = max(step, round(area / short / step) * step)
        if long < short or long / short > max_ratio:
            continue
        buckets.add((short, long))
        buckets.add((long, short))
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to the image's (compared in log space, so 1:2 and 2:1
    are equally far from 1:1). Images more extreme than every bucket go to the most extreme one and get cropped.
    """
    if not buckets:
        raise ValueError("no buckets to assign to; build them with make_buckets()")
    target = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


class BucketBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices that all share one bucket id.

    Deterministic for a given (seed, epoch): call `set_epoch(epoch)` before each epoch, as with torch's
    `DistributedSampler`. With `num_replicas > 1` each rank gets every num_replicas-th batch; all ranks get the
    same number of batches (DDP needs equal step counts), padded by repeating batches from the start unless
    `drop_last`, which drops incomplete batches and the remainder instead.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (every rank must call it with the same value)."""
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_ids):
            by_bucket.setdefault(bucket, []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def _rank_batch_count(self, total: int) -> int:
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_rank = self._rank_batch_count(len(batches))
        wanted = per_rank * self.num_replicas
        if batches:
            # Pad cyclically so every rank steps equally often (even with fewer batches than ranks).
            batches = [batches[i % len(batches)] for i in range(wanted)]
        yield from batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for bucket in self.bucket_ids:
            counts[bucket] = counts.get(bucket, 0) + 1
        rounding = math.floor if self.drop_last else math.ceil
        total = sum(rounding(n / self.batch_size) for n in counts.values())
        return self._rank_batch_count(total)
