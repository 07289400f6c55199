"""The prototype refresh's images: a detectron2-style inference loader over the fixed sample.

Images are read, decoded and resized by ``DATALOADER.NUM_WORKERS`` loader workers with the
test-time ``DatasetMapper`` (deterministic: the worker count cannot change an input). A batch
only ever holds images of the same padded size: padding an image further than it pads alone
changes the features near its right and bottom borders (the padded cells are not zero after
the first normalised layer), so a batch of mixed sizes would give other features than the
official one-image pass. The images are ordered by their padded size beforehand (from the
dataset dicts' ``height``/``width``), so that most batches are full.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from detectron2.data.transforms import ResizeShortestEdge

# one refresh batch: (dataset index, mapped input dict) per image
Batch = list[tuple[int, dict]]


class MappedImages(torch.utils.data.Dataset):
    """``(index, mapper(dataset_dicts[index]))`` for the given dataset indices, in order."""

    def __init__(self, dataset_dicts: list[dict], indices: list[int], mapper: Callable):
        self.dataset_dicts, self.indices, self.mapper = dataset_dicts, indices, mapper

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        index = self.indices[i]
        return index, self.mapper(dict(self.dataset_dicts[index]))


def _as_list(batch: list) -> list:
    return batch


def planned_padded_size(
    record: dict, min_size: int, max_size: int, size_divisibility: int
) -> tuple[int, int]:
    """The padded (H, W) the test mapper and the model's preprocessing will give an image,
    from its dataset dict (``(0, 0)`` when it has no ``height``/``width``)."""
    h, w = record.get("height"), record.get("width")
    if not h or not w:
        return (0, 0)
    h, w = ResizeShortestEdge.get_output_shape(h, w, min_size, max_size)
    d = max(int(size_divisibility), 1)
    return (math.ceil(h / d) * d, math.ceil(w / d) * d)


def padded_size(image: torch.Tensor, size_divisibility: int) -> tuple[int, int]:
    """(H, W) of a (C, H, W) image padded up to multiples of ``size_divisibility``."""
    d = max(int(size_divisibility), 1)
    return (math.ceil(image.shape[-2] / d) * d, math.ceil(image.shape[-1] / d) * d)


def refresh_batches(
    dataset_dicts: list[dict],
    indices: list[int],
    mapper: Callable[[dict], dict],
    batch_size: int,
    num_workers: int,
    min_size: int,
    max_size: int,
    size_divisibility: int,
) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` mapped images, each of one padded size.

    The images are loaded by a torch ``DataLoader`` with ``num_workers`` workers in the order
    of their planned padded size (then dataset index); a loaded batch that still mixes sizes
    (an image whose dict has no or wrong ``height``/``width``) is split into runs of one size.
    Which batch an image lands in does not change its features, so this order does not
    change the refresh's result.

    Args:
        indices: dataset indices of the images to load (this rank's share).
        min_size, max_size: the test-time resize (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST).
        size_divisibility: the backbone's (``backbone.size_divisibility``).
    """
    order = sorted(
        indices,
        key=lambda i: (
            planned_padded_size(dataset_dicts[i], min_size, max_size, size_divisibility),
            i,
        ),
    )
    loader = torch.utils.data.DataLoader(
        MappedImages(dataset_dicts, order, mapper),
        batch_size=max(int(batch_size), 1),
        shuffle=False,
        num_workers=int(num_workers),
        collate_fn=_as_list,
    )
    for batch in loader:
        run: Batch = []
        for item in batch:
            if run and padded_size(item[1]["image"], size_divisibility) != padded_size(
                run[0][1]["image"], size_divisibility
            ):
                yield run
                run = []
            run.append(item)
        if run:
            yield run
