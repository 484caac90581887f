"""Image folders: one sub-folder per class (``root/<class>/**/<image>``), or loose unlabeled files.

Sorted folder names give the label order (torchvision's ImageFolder convention; hidden folders are
skipped). Decoded, resized and cropped images are cached in memory (up to :data:`CACHE_BYTES`
per dataset), so a second pass costs no decoding.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import torch

from ..errors import DecomposeError
from ..errors import first_line as _first_line
from .dataset import _Data
from .spec import DataSpec
from .transforms import _finish, _Geometric, _pil, _to_unit_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
CACHE_BYTES = 1 << 30  # decoded images kept in memory per dataset; the rest are decoded each time


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


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_files(folder: Path) -> list[Path]:
    """The image files under one class folder, symbolic links followed, in the order
    ``sorted(os.walk(folder))`` would give them; but every real folder is entered once (a link
    loop is not followed round and round) and every real file counted once. A FIFO, device or
    dangling link with an image name is an error (opening it would block or fail later)."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    per_dir: list[tuple[str, list[Path]]] = []
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise DecomposeError(f"cannot read data folder {d} ({e.strerror}); check its "
                                 "permissions and links") from None
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        here: list[Path] = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    stack.append(Path(e.path))
                    continue
            except OSError:
                pass
            if not _is_image(e.name):
                continue
            try:
                fst = os.stat(e.path)
            except OSError as err:
                raise DecomposeError(f"image {e.path} cannot be read ({err.strerror}; a dangling "
                                     "or looping link?); fix or delete it") from None
            if not stat.S_ISREG(fst.st_mode):
                raise DecomposeError(f"image {e.path} is not a regular file (a FIFO, device or "
                                     "socket); delete it or move it out of the data folder")
            if (fst.st_dev, fst.st_ino) in seen_files:
                continue
            seen_files.add((fst.st_dev, fst.st_ino))
            here.append(Path(e.path))
        per_dir.append((d.as_posix() if isinstance(d, Path) else str(d), here))
    return [f for _, fs in sorted(per_dir, key=lambda t: t[0]) for f in fs]


def _scan_folder(root: Path, labels_required: bool
                 ) -> tuple[list[str], list[Path], list[int] | None]:
    """(class names, image files, labels or None) for an image folder; raises on a bad layout."""
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    except OSError as e:
        raise DecomposeError(f"cannot read data folder {root} ({e.strerror}); check its "
                             "permissions") from None
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
        found = _class_files(root / name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DecomposeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class sub-folders "
                             f"of {root}; put the images in {root}/<class>/")
    return classes, files, labels
