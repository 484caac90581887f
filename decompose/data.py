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

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DecomposeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_BYTES = 1 << 30  # decoded images kept in memory per dataset; the rest are decoded each time
AUGMENT_PADDING = 4

try:  # optional: pixel transforms from torchvision when present
    import torchvision.transforms as _tvt
except Exception:  # noqa: BLE001 - any import failure means "not usable here"
    _tvt = None


def has_torchvision() -> bool:
    """True when torchvision's transforms are importable (and so used for eval preprocessing)."""
    return _tvt is not None


@dataclass(frozen=True)
class DataSpec:
    """How images become tensors. Every field is a keyword with a default; validated on creation.

    Args:
        resize: resize the shorter side to this many pixels (bilinear, antialiased), keeping the
            aspect ratio; None keeps the size. Default None.
        crop: center crop to ``crop`` x ``crop`` (zero padding where the image is smaller);
            None keeps the size. Default None.
        mean: per-channel mean subtracted after scaling to [0, 1]; one value or one per channel.
            Default (None): the ImageNet mean (0.485, 0.456, 0.406), which the CIFAR ResNets
            use; with ``grayscale``, its average (0.449,).
        std: per-channel divisor. Default (None): the ImageNet std (0.229, 0.224, 0.225); with
            ``grayscale``, its average (0.226,).
        grayscale: convert to one channel (PIL "L") instead of RGB. Default False.
        augment: training augmentation after cropping: pad 4 pixels of zeros, take a random crop
            of the image's size, flip horizontally with probability 0.5 (the CIFAR recipe; uses
            torch's global random generator, as torchvision does). Default False.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False
    augment: bool = False

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DecomposeError(f"{name} must be a positive number of pixels or None, got {v!r}")
        for name, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            v = getattr(self, name)
            if v is None:
                v = default if self.channels == 3 else (round(sum(default) / 3, 3),)
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                vals = tuple(float(t) for t in (v if np.iterable(v) else [v]))
            except (TypeError, ValueError):
                raise DecomposeError(f"{name} must be numbers, e.g. 0.5 or 0.485,0.456,0.406; "
                                     f"got {v!r}") from None
            if len(vals) not in (1, self.channels):
                raise DecomposeError(
                    f"{name} has {len(vals)} values but the images have {self.channels} "
                    f"channel(s); give one value or {self.channels}")
            object.__setattr__(self, name, vals)
        if any(s <= 0 for s in self.std):
            raise DecomposeError(f"std values must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        """Channels of the produced tensors: 1 with ``grayscale``, else 3."""
        return 1 if self.grayscale else 3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``DataSpec(**d)`` rebuilds it."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


# ---------------------------------------------------------------------------------------------
# Pixel transforms. Geometric part: PIL image -> PIL image; tensor part: uint8 HWC -> float CHW.

def _resize_pil(img, size: int):
    # torchvision's rule: the shorter side becomes `size`, the longer one int(size * long / short)
    Image = _pil()

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def _center_crop_pil(img, size: int):
    # torchvision's rule: zero-pad when too small, then crop at round((H - h) / 2)
    Image = _pil()

    w, h = img.size
    if size > w or size > h:
        left = (size - w) // 2 if size > w else 0
        top = (size - h) // 2 if size > h else 0
        right = (size - w + 1) // 2 if size > w else 0
        bottom = (size - h + 1) // 2 if size > h else 0
        padded = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class _Geometric:
    """The resize + crop of a spec as a picklable PIL -> PIL callable (torchvision's if present)."""

    def __init__(self, resize: int | None, crop: int | None) -> None:
        self.resize, self.crop = resize, crop
        self.tv = None
        if _tvt is not None:
            ops = [_tvt.Resize(resize)] if resize is not None else []
            ops += [_tvt.CenterCrop(crop)] if crop is not None else []
            self.tv = _tvt.Compose(ops)

    def __call__(self, img):
        if self.tv is not None:
            return self.tv(img)
        if self.resize is not None:
            img = _resize_pil(img, self.resize)
        if self.crop is not None:
            img = _center_crop_pil(img, self.crop)
        return img


def _to_unit_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [0, 1], exactly as torchvision's ToTensor."""
    if _tvt is not None:
        return _tvt.functional.to_tensor(arr)
    return torch.from_numpy(arr.transpose(2, 0, 1)).contiguous().to(torch.float32).div(255)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Pad with zeros, random crop back to the same size, random horizontal flip. (C, H, W)."""
    p = AUGMENT_PADDING
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    i = int(torch.randint(0, 2 * p + 1, ()).item())
    j = int(torch.randint(0, 2 * p + 1, ()).item())
    x = padded[:, i:i + h, j:j + w]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x.contiguous()


def _normalize(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    mean = torch.as_tensor(spec.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(spec.std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _finish(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """[0, 1] (C, H, W) -> optional augmentation -> normalised."""
    if spec.augment:
        x = _augment(x)
    return _normalize(x, spec)


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
        if limit < len(self.indices):
            pick = np.random.default_rng(seed).choice(len(self.indices), limit, replace=False)
            self.indices = self.indices[np.sort(pick)]


class ImageFolderData(_Data):
    """Images under ``root``: one sub-folder per class, or (``labels_required=False``) loose files.

    Args:
        root: the folder.
        spec: preprocessing. Default ``DataSpec()``.
        labels_required: when False, a folder holding images and no class sub-folders is read as
            unlabeled data (label -1). Default True.
    """

    def __init__(self, root: str | os.PathLike, spec: DataSpec | None = None,
                 labels_required: bool = True) -> None:
        self.root = Path(root)
        self.spec = spec or DataSpec()
        self.classes, self.files, labels = _scan_folder(self.root, labels_required)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(self.files))
        self._geometric = _Geometric(self.spec.resize, self.spec.crop)
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def _name(self, j: int) -> str:
        return str(self.files[j])

    def _decode(self, j: int) -> np.ndarray:
        Image = _pil()

        path = self.files[j]
        try:
            with Image.open(path) as im:
                img = im.convert("L" if self.spec.grayscale else "RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DecomposeError(f"cannot read image {path} ({_first_line(e)}); "
                                 f"delete or replace that file") from None
        arr = np.array(self._geometric(img), dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def _image(self, j: int) -> torch.Tensor:
        arr = self._cache.get(j)
        if arr is None:
            arr = self._decode(j)
            if self._cached_bytes + arr.nbytes <= CACHE_BYTES:
                self._cache[j] = arr
                self._cached_bytes += arr.nbytes
        return _finish(_to_unit_tensor(arr), self.spec)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DecomposeError("reading images needs Pillow; install it with "
                             "pip install pillow (or pip install 'decompose[images]')") from None
    return Image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(root: Path, labels_required: bool
                 ) -> tuple[list[str], list[Path], list[int] | None]:
    """(class names, image files, labels or None) for an image folder; raises on a bad layout."""
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if not entries:
        raise DecomposeError(f"data folder {root} is empty; put one sub-folder of images per "
                             f"class in it ({root}/<class>/<image>.jpg)")
    classes = sorted(e.name for e in entries if e.is_dir())
    loose = sorted(Path(e.path) for e in entries if e.is_file() and _is_image(e.name))
    if not classes:
        if loose and not labels_required:
            return [], loose, None
        if loose:
            raise DecomposeError(
                f"data folder {root} holds images directly but no class sub-folders; move them "
                f"into one sub-folder per class ({root}/<class>/<image>), sorted names = labels")
        raise DecomposeError(f"data folder {root} has no class sub-folders and no images; "
                             f"put one sub-folder of images per class in it")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, fnames in sorted(os.walk(root / name, followlinks=True)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fname in sorted(fnames):
                if _is_image(fname) and not fname.startswith("."):
                    files.append(Path(dirpath) / fname)
                    labels.append(label)
    if not files:
        raise DecomposeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class sub-folders "
                             f"of {root}; put the images in {root}/<class>/")
    return classes, files, labels


class ArrayData(_Data):
    """Images from an ``.npz`` file: ``x`` required, ``y`` and ``classes`` optional.

    uint8 (or other integer 0-255) arrays are scaled by 1/255 and, when ``resize``/``crop`` are
    set, resized through PIL exactly as image files are; float arrays must already be in [0, 1]
    and are resized with torch's antialiased bilinear interpolation.

    Args:
        path: the ``.npz`` file.
        spec: preprocessing. Default ``DataSpec()``.
        labels_required: raise when there is no ``y``. Default True.
    """

    def __init__(self, path: str | os.PathLike, spec: DataSpec | None = None,
                 labels_required: bool = True) -> None:
        self.root = Path(path)
        self.spec = spec or DataSpec()
        self.x, self.labels, self.classes = _read_npz(self.root, labels_required)
        self.indices = np.arange(len(self.x))
        self._geometric = _Geometric(self.spec.resize, self.spec.crop)

    def _name(self, j: int) -> str:
        return f"{self.root}[{j}]"

    def _image(self, j: int) -> torch.Tensor:
        a = self.x[j]  # (H, W, C)
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.uint8, copy=False)
            if self.spec.resize is not None or self.spec.crop is not None:
                a = _pil_geometric(a, self._geometric)
            x = _to_unit_tensor(np.ascontiguousarray(a))
        else:
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).to(torch.float32)
            x = _tensor_geometric(x, self.spec)
        x = _match_channels(x, self.spec.channels)
        return _finish(x, self.spec)


def _pil_geometric(a: np.ndarray, geometric: Callable) -> np.ndarray:
    Image = _pil()

    img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
    out = np.array(geometric(img), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def _tensor_geometric(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    if spec.resize is not None:
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_short, new_long = spec.resize, int(spec.resize * long / short)
        size = (new_long, new_short) if w <= h else (new_short, new_long)
        if size != (h, w):
            x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear",
                                                align_corners=False, antialias=True)[0]
    if spec.crop is not None:
        c = spec.crop
        h, w = x.shape[-2:]
        if c > h or c > w:
            ph, pw = max(c - h, 0), max(c - w, 0)
            x = torch.nn.functional.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
            h, w = x.shape[-2:]
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        x = x[:, top:top + c, left:left + c]
    return x.contiguous()


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray -> RGB by repetition, RGB -> gray by PIL's luma weights (ITU-R 601-2)."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    return (x[:3] * weights).sum(0, keepdim=True)


def _read_npz(path: Path, labels_required: bool
              ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(x as (N, H, W, C), labels or None, class names) from an .npz; raises on bad content."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip, pickle and format errors all mean "unreadable"
        raise DecomposeError(f"cannot read {path} as an .npz file ({_first_line(e)}); "
                             f"save it with numpy.savez(path, x=images, y=labels)") from None
    keys = ", ".join(sorted(arrays)) or "none"
    if "x" not in arrays:
        raise DecomposeError(f"{path} has no array 'x' (keys: {keys}); save images as x with shape "
                             f"(N, C, H, W) or (N, H, W, C) and labels as y")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, :, :, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    elif not (x.ndim == 4 and x.shape[3] in (1, 3)):
        raise DecomposeError(f"{path}: x has shape {tuple(x.shape)}; expected (N, C, H, W) or "
                             f"(N, H, W, C) with 1 or 3 channels, or (N, H, W)")
    if len(x) == 0:
        raise DecomposeError(f"{path}: x holds no images; save at least one")
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise DecomposeError(
                f"{path}: x holds floats outside [0, 1] (min {lo:.3g}, max {hi:.3g}); store raw "
                f"pixels as uint8 0-255 or floats in [0, 1] (mean/std are applied here)")
    elif np.issubdtype(x.dtype, np.integer):
        if x.dtype != np.uint8 and (int(x.min()) < 0 or int(x.max()) > 255):
            raise DecomposeError(f"{path}: x holds integers outside 0-255; store uint8 pixels")
    else:
        raise DecomposeError(f"{path}: x has dtype {x.dtype}; store uint8 0-255 or floats in [0, 1]")

    y = arrays.get("y")
    if y is None:
        if labels_required:
            raise DecomposeError(f"{path} has no labels (array 'y'; keys: {keys}); add y with one "
                                 f"integer class per image")
        return x, None, _class_names(arrays, 0)
    y = np.asarray(y).reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DecomposeError(f"{path}: y must be {len(x)} integer labels, one per image in x; got "
                             f"shape {tuple(y.shape)} dtype {y.dtype}")
    if y.min() < 0:
        raise DecomposeError(f"{path}: y holds negative labels; labels must be 0..classes-1")
    return x, y.astype(np.int64), _class_names(arrays, int(y.max()) + 1)


def _class_names(arrays: dict[str, np.ndarray], n: int) -> list[str]:
    names = arrays.get("classes")
    if names is not None and names.ndim == 1 and len(names) >= n:
        return [str(s) for s in names.tolist()]
    return [str(i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Entry points.

def open_dataset(path: str | os.PathLike, spec: DataSpec | None = None, *, limit: int | None = None,
                 seed: int = 0, labels_required: bool = True) -> _Data:
    """The dataset at ``path`` (an image folder or an ``.npz``), optionally a seeded subset.

    Args:
        path: a folder of class sub-folders, or an ``.npz`` file.
        spec: preprocessing. Default ``DataSpec()``.
        limit: keep this many samples, picked at random with ``seed`` (the same ones on every
            run), in their original order; None keeps all. Default None.
        seed: seed of the subset. Default 0.
        labels_required: raise for data without labels. Default True.

    Returns:
        A ``torch.utils.data.Dataset`` with ``classes`` (names, in label order), ``spec``,
        ``labels`` (None when unlabeled) and ``describe(i)``; items are ``(image, label)``, label
        -1 when unlabeled.
    """
    p = Path(path)
    if not p.exists():
        raise DecomposeError(f"data path {p} does not exist; give a folder of class sub-folders "
                             f"or an .npz file")
    if p.is_dir():
        data: _Data = ImageFolderData(p, spec, labels_required)
    elif p.suffix.lower() == ".npz":
        data = ArrayData(p, spec, labels_required)
    else:
        raise DecomposeError(f"{p} is neither a folder nor an .npz file; give a folder of class "
                             f"sub-folders (<class>/<image>.jpg) or an .npz with arrays x and y")
    data.subset(limit, seed)
    return data


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs; images of different sizes raise a DecomposeError."""
    shapes = {tuple(x.shape) for x, _ in batch}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DecomposeError(f"the images are not all the same size ({_fmt(a)} and {_fmt(b)}); "
                             f"set resize and crop (e.g. --resize 32 --crop 32) to make them equal")
    return (torch.stack([x for x, _ in batch]),
            torch.tensor([y for _, y in batch], dtype=torch.int64))


class _Loader(DataLoader):
    """A DataLoader whose errors from worker processes stay one-line DecomposeErrors (torch
    re-raises them with the worker's traceback in the message)."""

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DecomposeError as e:
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                if len(lines) <= 1:
                    raise
                last = lines[-1].split("DecomposeError: ", 1)[-1]
                raise DecomposeError(last) from None
            yield batch


def _fmt(shape: Sequence[int]) -> str:
    return f"{shape[-2]}x{shape[-1]} pixels, {shape[0]} channel(s)"


def make_loader(path: str | os.PathLike, *, batch_size: int = 128, limit: int | None = None,
                seed: int = 0, train: bool = False, resize: int | None = None,
                crop: int | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, grayscale: bool = False,
                num_workers: int = 0, shuffle: bool = False, labels_required: bool = True
                ) -> DataLoader:
    """A DataLoader of ``(images, labels)`` batches from an image folder or an ``.npz`` file.

    Args:
        path: a folder of class sub-folders (``<class>/<image>``), or an ``.npz`` with ``x``/``y``.
        batch_size: Default 128.
        limit: use only this many samples, a seeded random subset; None uses all. Default None.
        seed: seed of the subset and of the shuffling order. Default 0.
        train: apply the training augmentation (random crop with 4-pixel padding, horizontal
            flip). Default False.
        resize: shorter side in pixels, or None to keep. Default None.
        crop: center crop size in pixels, or None. Default None.
        mean: normalisation mean, one value or one per channel. Default (None) ImageNet's
            (0.485, 0.456, 0.406), or (0.449,) with ``grayscale``.
        std: normalisation std. Default (None) ImageNet's (0.229, 0.224, 0.225), or (0.226,)
            with ``grayscale``.
        grayscale: one channel instead of RGB. Default False.
        num_workers: DataLoader worker processes; 0 decodes in this process and keeps the cache
            across passes. Default 0.
        shuffle: reshuffle every pass (order seeded by ``seed``). Default False.
        labels_required: raise for data without labels; when False unlabeled samples get label
            -1. Default True.

    The dataset (``loader.dataset``) has ``classes``, ``spec`` and ``describe(i)``.
    """
    spec = DataSpec(resize=resize, crop=crop, mean=mean, std=std, grayscale=grayscale,
                    augment=train)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DecomposeError(f"batch_size must be a positive integer, got {batch_size!r}")
    data = open_dataset(path, spec, limit=limit, seed=seed, labels_required=labels_required)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return _Loader(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                   collate_fn=collate, generator=gen)


def calibration_batches(path: str | os.PathLike, n_samples: int = 512, batch_size: int = 64,
                        seed: int = 0, **preproc: Any) -> Iterator[torch.Tensor]:
    """Image batches only (labels ignored) for label-free calibration.

    Works on labeled or unlabeled data: an ``.npz`` without ``y``, or a folder of images with no
    class sub-folders. The data is opened (and checked) when this is called; batches are decoded
    as they are iterated.

    Args:
        path: an image folder or ``.npz``.
        n_samples: how many images, a seeded random subset; None for all. Default 512.
        batch_size: Default 64.
        seed: seed of the subset. Default 0.
        **preproc: ``resize``, ``crop``, ``mean``, ``std``, ``grayscale`` as in :func:`make_loader`.
    """
    loader = make_loader(path, batch_size=batch_size, limit=n_samples, seed=seed,
                         labels_required=False, **preproc)

    def images() -> Iterator[torch.Tensor]:
        for x, _ in loader:
            yield x
    return images()


def check_input_shape(model_input_shape: Sequence[int] | None, sample_shape: Sequence[int]) -> None:
    """Raise a DecomposeError when one sample's shape (C, H, W) differs from the model's.

    ``model_input_shape`` None (unknown) passes. Channels are compared first, then the size.
    """
    if model_input_shape is None:
        return
    want, got = tuple(int(s) for s in model_input_shape), tuple(int(s) for s in sample_shape)
    if want == got:
        return
    if len(want) != len(got):
        raise DecomposeError(f"the samples have shape {got} but the model expects {want}; "
                             f"give data of the model's kind")
    if want[0] != got[0]:
        fix = "use RGB images (drop --grayscale)" if want[0] == 3 else \
            "use grayscale (--grayscale)" if want[0] == 1 else "use images with that many channels"
        raise DecomposeError(f"the images have {got[0]} channel(s) but the model expects "
                             f"{want[0]}; {fix}")
    size = "x".join(str(s) for s in want[1:])
    fix = f"use {size} images"
    if len(set(want[1:])) == 1:
        fix = f"set resize and crop (--resize {want[-1]} --crop {want[-1]}) or {fix}"
    raise DecomposeError(f"the images are {'x'.join(str(s) for s in got[1:])} pixels but the "
                         f"model expects {size}; {fix}")
