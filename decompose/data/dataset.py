"""The part every dataset shares: (image, label) items, ``describe(i)``, seeded subsets."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DecomposeError
from .spec import DataSpec

# ---------------------------------------------------------------------------------------------
# Datasets. Each item is (image tensor, label); label -1 where the data has no labels.

class _Data(Dataset):
    """Common part: ``classes``, ``labels`` (or None), ``spec`` and an optional index subset."""

    classes: list[str]
    labels: np.ndarray | None
    spec: DataSpec
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        label = -1 if self.labels is None else int(self.labels[j])
        return self._image(j), label

    def _image(self, j: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """A name for item ``i`` of this dataset (subset applied): a file path or ``file[index]``."""
        return self._name(int(self.indices[i]))

    def _name(self, j: int) -> str:
        return f"sample {j}"

    def subset(self, limit: int | None, seed: int) -> None:
        """Keep ``limit`` samples picked by a seeded random choice, in their original order."""
        if limit is None:
            return
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise DecomposeError(f"limit must be a positive number of samples or None, got {limit!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise DecomposeError(f"seed must be an integer from 0 to {2**32 - 1}, got {seed!r}; "
                                 "e.g. --seed 0")
        if limit < len(self.indices):
            pick = np.random.default_rng(seed).choice(len(self.indices), limit, replace=False)
            self.indices = self.indices[np.sort(pick)]


