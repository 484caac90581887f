"""Data: image folders and ``.npz`` arrays as DataLoaders, with the CIFAR ResNets' preprocessing.

Two sources:

* an image folder, one sub-folder per class (``root/<class>/**/<image>``); sorted folder names give
  the label order (torchvision's ImageFolder convention; hidden folders are skipped). Extensions:
  .jpg .jpeg .png .bmp .ppm .webp, any case.
* an ``.npz`` file with ``x`` (N, C, H, W) or (N, H, W, C) or (N, H, W), uint8 0-255 or float in
  [0, 1], optional ``y`` (N,) integer labels and optional ``classes`` (names).

Eval preprocessing, in order: decode and convert to RGB (or grayscale), resize the shorter side,
center crop, scale to [0, 1], normalise with mean/std. Decoded, resized and cropped images are
cached in memory (up to :data:`CACHE_BYTES` per dataset), so a second pass costs no decoding.

The folder scan is ours in every case (so labels and file order never depend on what is
installed, and a bad file can be named); the pixel transforms are torchvision's when
``import torchvision`` works, else an equivalent PIL + numpy + torch implementation that gives
the same tensors (tests/test_data.py checks this where torchvision is installed).
"""

from .arrays import ArrayData
from .checks import check_input_shape
from .folders import CACHE_BYTES, IMAGE_EXTENSIONS, ImageFolderData
from .loaders import calibration_batches, collate, make_loader, open_dataset
from .spec import IMAGENET_MEAN, IMAGENET_STD, DataSpec
from .transforms import AUGMENT_PADDING, has_torchvision

__all__ = [
    "AUGMENT_PADDING",
    "ArrayData",
    "CACHE_BYTES",
    "DataSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "calibration_batches",
    "check_input_shape",
    "collate",
    "has_torchvision",
    "make_loader",
    "open_dataset",
]
