"""Training inputs as bank mode reads them: the mapper that says which geometric transforms it
applied to each image, and where an original box lies in an input.

Bank mode (MODEL.GKD.REFRESH_MODE "bank") pools the sample's boxes from training inputs, so it
must know where each box lies in the input: how the image was resized, and whether it was
flipped. detectron2's ``DatasetMapper`` applies its augmentations and keeps no record of them;
this subclass keeps the ``TransformList`` it drew under ``"applied_transforms"``, through
``DatasetMapper``'s public attribute ``augmentations``. Nothing else changes: the same draws
from the same RNGs, the same image and instances.
"""

from __future__ import annotations

import torch
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from torch import Tensor

# ground-truth and sampled boxes agree to float rounding; a wrong transform is pixels off
MATCH_TOLERANCE_PX = 0.5


class RecordingAugmentationList(T.AugmentationList):
    """An ``AugmentationList`` that keeps the ``TransformList`` of its last call."""

    def __call__(self, aug_input: T.AugInput) -> T.TransformList:
        self.last = super().__call__(aug_input)
        return self.last


class TransformRecordingMapper(DatasetMapper):
    """``DatasetMapper`` whose output dicts also hold ``"applied_transforms"``: the
    ``TransformList`` that took the original image to the model's input (built from the same
    config or arguments as ``DatasetMapper``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.augmentations = RecordingAugmentationList(self.augmentations.augs)

    def __call__(self, dataset_dict: dict) -> dict:
        out = super().__call__(dataset_dict)
        if out is not None:
            out["applied_transforms"] = self.augmentations.last
        return out


def resize_and_flip(transforms: T.TransformList) -> bool | None:
    """Whether ``transforms`` flip the image horizontally, when they only resize and flip it
    (so that a box lies where the test-time resize, then the flip, puts it); None for any
    other transform (a crop, a rotation...), whose boxes the refresh extracts instead."""
    flipped = False
    for t in transforms.transforms:
        if isinstance(t, T.HFlipTransform):
            flipped = not flipped
        elif not isinstance(t, T.ResizeTransform | T.NoOpTransform):
            return None
    return flipped


def boxes_in_input(
    boxes: Tensor, original_size: tuple[int, int], image_size: tuple[int, int]
) -> Tensor:
    """(n, 4) XYXY boxes of an original (H, W) image scaled to its resized input's (H, W), as
    the test-time resize places them: one computation for the refresh and the harvest, so that
    a harvested box is the extracted one to the bit."""
    (h0, w0), (h, w) = original_size, image_size
    return boxes * torch.tensor([w / w0, h / h0] * 2)


def flipped_horizontally(boxes: Tensor, width: int) -> Tensor:
    """(n, 4) XYXY boxes of an input of ``width`` as they lie in its horizontal mirror."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def placed_by_transforms(
    boxes: Tensor,
    original_size: tuple[int, int],
    image_size: tuple[int, int],
    transforms: T.TransformList,
    allow_flip: bool = True,
) -> Tensor | None:
    """The sampled boxes of one image as they lie in its training input, by the transforms
    the mapper recorded: the test-time placement (:func:`boxes_in_input`), mirrored when they
    flip; None for a transform other than a resize or a flip, or a flip when not allowed.

    Args:
        boxes: (n, 4) XYXY in original pixels.
        original_size, image_size: (H, W) of the original image and of the input (unpadded).
    """
    flipped = resize_and_flip(transforms)
    if flipped is None or (flipped and not allow_flip):
        return None
    scaled = boxes_in_input(boxes, original_size, image_size)
    return flipped_horizontally(scaled, image_size[1]) if flipped else scaled


def placed_boxes(
    boxes: Tensor,
    original_size: tuple[int, int],
    image_size: tuple[int, int],
    gt: Tensor,
    allow_flip: bool = True,
) -> Tensor | None:
    """The sampled boxes of one image as they lie in its training input, or None.

    The test-time placement scales by the input's size over the original (as the refresh
    does); the training input may also be flipped horizontally. The placement under which
    every box equals a ground-truth box (clipped to the image) is returned, unclipped, as the
    refresh pools it; None when neither fits.

    Args:
        boxes: (n, 4) XYXY in original pixels.
        original_size, image_size: (H, W) of the original image and of the input (unpadded).
        gt: (G, 4) the input's ground-truth boxes.
        allow_flip: False: a flipped input gives None.
    """
    h, w = image_size
    scaled = boxes_in_input(boxes, original_size, image_size)
    flipped = flipped_horizontally(scaled, w)
    limit = torch.tensor([w, h, w, h], dtype=scaled.dtype)
    for placed in (scaled, flipped) if allow_flip else (scaled,):
        clipped = torch.minimum(placed.clamp(min=0), limit)
        if len(gt) and bool(
            ((clipped[:, None, :] - gt[None].to(clipped)).abs().amax(2) < MATCH_TOLERANCE_PX)
            .any(1)
            .all()
        ):
            return placed
    return None
