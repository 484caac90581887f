"""decompose.data: image folders and .npz arrays, preprocessing, subsets, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from decompose import data as D
from decompose.data import DataSpec, calibration_batches, check_input_shape, make_loader
from decompose.errors import DecomposeError

PIL = pytest.importorskip("PIL.Image")
CIFAR_TEST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10" / "test"
needs_cifar = pytest.mark.skipif(not CIFAR_TEST.is_dir(),
                                 reason="../shared/data/cifar10 is not next to this clone")
EXACT = dict(mean=(0.0,), std=(1.0,))  # no normalisation: tensors are pixel / 255
ATOL = 1e-6  # float32 rounding of pixel / 255


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(arr).save(path)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """3 classes (created out of order), 2-3 PNGs each, a nested one, an upper-case extension,
    a non-image file and a hidden folder that must all be handled."""
    root = tmp_path / "imgs"
    pix: dict[str, list[np.ndarray]] = {}
    for k, (name, n) in enumerate([("zebra", 2), ("apple", 3), ("mango", 2)]):
        pix[name] = [_rgb(8, 8, 10 * k + i) for i in range(n)]
        for i, a in enumerate(pix[name]):
            _png(root / name / f"{i}.png", a)
    # nested sub-folder and an upper-case extension count; notes and hidden folders do not
    extra = _rgb(8, 8, 99)
    _png(root / "mango" / "sub" / "x.PNG", extra)
    pix["mango"].append(extra)
    (root / "apple" / "notes.txt").write_text("not an image")
    _png(root / ".cache" / "junk.png", _rgb(8, 8, 5))
    return root, pix


def test_folder_labels_follow_sorted_class_names(folder):
    root, pix = folder
    loader = make_loader(root, batch_size=4, **EXACT)
    ds = loader.dataset
    assert ds.classes == ["apple", "mango", "zebra"]
    assert [int(v) for v in ds.labels] == [0, 0, 0, 1, 1, 1, 2, 2]
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = [a for name in ds.classes for a in pix[name]]
    for got, a in zip(x, expected):
        ref = torch.from_numpy(a).permute(2, 0, 1).float() / 255
        assert torch.allclose(got, ref, atol=ATOL)
    assert ds.describe(7).endswith("1.png") and "zebra" in ds.describe(7)


def test_default_normalisation_is_imagenet_mean_std(folder):
    root, pix = folder
    x, _ = make_loader(root).dataset[0]
    ref = torch.from_numpy(pix["apple"][0]).permute(2, 0, 1).float() / 255
    mean = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (ref - mean) / std, atol=1e-5)


def test_limit_is_a_seeded_reproducible_subset(folder):
    root, _ = folder
    a = make_loader(root, limit=5, seed=1).dataset
    b = make_loader(root, limit=5, seed=1).dataset
    c = make_loader(root, limit=5, seed=2).dataset
    assert len(a) == 5 and list(a.indices) == list(b.indices)
    assert list(a.indices) == sorted(a.indices)
    assert list(a.indices) != list(c.indices)
    assert a.describe(0) == make_loader(root).dataset.describe(int(a.indices[0]))
    assert len(make_loader(root, limit=100).dataset) == 8
    with pytest.raises(DecomposeError, match="limit"):
        make_loader(root, limit=0)


def test_shuffle_is_seeded(folder):
    root, _ = folder
    order = [torch.cat([y for _, y in make_loader(root, batch_size=3, shuffle=True, seed=s)])
             for s in (0, 0, 1)]
    assert torch.equal(order[0], order[1])
    assert sorted(order[0].tolist()) == sorted(order[2].tolist())


def test_resize_and_center_crop_follow_torchvision_rules(tmp_path):
    a = _rgb(30, 40, 0)  # H=30, W=40
    _png(tmp_path / "d" / "c" / "a.png", a)
    x, _ = make_loader(tmp_path / "d", resize=16, **EXACT).dataset[0]
    # shorter side 30 -> 16, longer int(16 * 40 / 30) = 21, PIL bilinear
    ref = np.asarray(PIL.fromarray(a).resize((21, 16), PIL.BILINEAR))
    assert x.shape == (3, 16, 21)
    assert torch.allclose(x, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255, atol=ATOL)
    x, _ = make_loader(tmp_path / "d", crop=25, **EXACT).dataset[0]
    top, left = int(round(5 / 2.0)), int(round(15 / 2.0))  # round half to even: 2, 8
    ref = torch.from_numpy(a[top:top + 25, left:left + 25].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, ref, atol=ATOL)


def test_crop_larger_than_the_image_pads_with_zeros(tmp_path):
    a = np.full((4, 4, 3), 255, np.uint8)
    _png(tmp_path / "d" / "c" / "a.png", a)
    x, _ = make_loader(tmp_path / "d", crop=7, **EXACT).dataset[0]
    assert x.shape == (3, 7, 7)
    assert x.sum().item() == pytest.approx(3 * 16)  # the 4x4 white square, zeros around it
    assert x[:, 1:5, 1:5].min().item() == 1.0


def test_grayscale_gives_one_channel_and_checks_mean_length(folder):
    root, pix = folder
    x, _ = make_loader(root, grayscale=True, **EXACT).dataset[0]
    ref = np.asarray(PIL.fromarray(pix["apple"][0]).convert("L"))
    assert x.shape == (1, 8, 8)
    assert torch.allclose(x[0], torch.from_numpy(ref.copy()).float() / 255, atol=ATOL)
    assert DataSpec(grayscale=True).mean == (0.449,)
    with pytest.raises(DecomposeError, match="mean has 3 values"):
        make_loader(root, grayscale=True, mean=D.IMAGENET_MEAN)
    with pytest.raises(DecomposeError, match="std values must be positive"):
        make_loader(root, std=(0.0,))


def test_train_augmentation_keeps_shape_and_varies(folder):
    root, _ = folder
    ds = make_loader(root, train=True, **EXACT).dataset
    plain = make_loader(root, **EXACT).dataset[0][0]
    torch.manual_seed(0)
    views = [ds[0][0] for _ in range(20)]
    assert all(v.shape == plain.shape for v in views)
    assert any(not torch.equal(v, plain) for v in views)
    # every view is the image shifted by at most 4 pixels (and maybe mirrored), zeros elsewhere
    assert all(v.max() <= plain.max() + ATOL for v in views)


def test_images_are_cached_after_the_first_pass(folder, monkeypatch):
    root, _ = folder
    ds = make_loader(root).dataset
    first = [ds[i][0] for i in range(len(ds))]
    monkeypatch.setattr(ds, "_decode", lambda j: pytest.fail("decoded twice"))
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw", "float"])
def test_npz_layouts_give_the_same_tensors_as_a_folder(tmp_path, layout):
    imgs = np.stack([_rgb(6, 6, i) for i in range(4)])  # (N, H, W, C)
    y = np.array([1, 0, 1, 2])
    if layout == "nhw":
        imgs = imgs[..., 0]
        x = imgs
    elif layout == "nchw":
        x = imgs.transpose(0, 3, 1, 2)
    elif layout == "float":
        x = imgs.astype(np.float32) / 255
    else:
        x = imgs
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["a", "b", "c"]))
    gray = layout == "nhw"
    ds = make_loader(tmp_path / "d.npz", grayscale=gray, **EXACT).dataset
    assert ds.classes == ["a", "b", "c"] and len(ds) == 4
    for i in range(4):
        _png(tmp_path / "f" / f"c{y[i]}" / f"{i}.png", imgs[i])
    fold = make_loader(tmp_path / "f", grayscale=gray, **EXACT).dataset
    by_name = {Path(fold.describe(j)).stem: fold[j][0] for j in range(len(fold))}
    for i in range(4):
        got, label = ds[i]
        assert label == y[i]
        assert torch.allclose(got, by_name[str(i)], atol=ATOL)


def test_npz_without_labels(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(DecomposeError, match="no labels"):
        make_loader(tmp_path / "u.npz")
    loader = make_loader(tmp_path / "u.npz", labels_required=False)
    x, y = next(iter(loader))
    assert x.shape == (3, 3, 4, 4) and y.tolist() == [-1, -1, -1]


def test_npz_resize_of_uint8_matches_the_folder_path(tmp_path):
    a = _rgb(12, 10, 3)
    np.savez(tmp_path / "d.npz", x=a[None], y=np.array([0]))
    _png(tmp_path / "f" / "c" / "a.png", a)
    got = make_loader(tmp_path / "d.npz", resize=7, crop=6).dataset[0][0]
    ref = make_loader(tmp_path / "f", resize=7, crop=6).dataset[0][0]
    assert got.shape == (3, 6, 6) and torch.allclose(got, ref, atol=1e-5)
    np.savez(tmp_path / "f.npz", x=(a[None] / 255).astype(np.float32), y=np.array([0]))
    assert make_loader(tmp_path / "f.npz", resize=7, crop=6).dataset[0][0].shape == (3, 6, 6)


def test_calibration_batches_yield_images_only(folder, tmp_path):
    root, _ = folder
    batches = list(calibration_batches(root, n_samples=5, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (3, 8, 8) for b in batches)
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.jpg", _rgb(8, 8, i))
    assert sum(len(b) for b in calibration_batches(flat)) == 3


def test_check_input_shape():
    check_input_shape((3, 32, 32), (3, 32, 32))
    check_input_shape(None, (3, 5, 5))
    with pytest.raises(DecomposeError, match="--resize 32 --crop 32"):
        check_input_shape((3, 32, 32), (3, 40, 40))
    with pytest.raises(DecomposeError, match="1 channel"):
        check_input_shape((3, 32, 32), (1, 32, 32))


# ------------------------------------------------------------------------------- bad inputs
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and ";" in msg  # what is wrong; what to do
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(DecomposeError, match="does not exist") as e:
        make_loader(tmp_path / "nope")
    _one_line(e)


def test_empty_folder(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(DecomposeError, match="is empty") as e:
        make_loader(tmp_path / "e")
    _one_line(e)


def test_images_directly_inside_without_class_folders(tmp_path):
    _png(tmp_path / "flat" / "a.png", _rgb(4, 4, 0))
    with pytest.raises(DecomposeError, match="no class sub-folders") as e:
        make_loader(tmp_path / "flat")
    _one_line(e)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "d" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DecomposeError, match="no images") as e:
        make_loader(tmp_path / "d")
    _one_line(e)


def test_corrupt_image_names_the_file(folder):
    root, _ = folder
    bad = root / "apple" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    loader = make_loader(root)
    with pytest.raises(DecomposeError, match="9.png") as e:
        list(loader)
    _one_line(e)


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "d" / "c" / "a.jpg"
    path.parent.mkdir(parents=True)
    PIL.fromarray(_rgb(16, 16, 0)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DecomposeError, match="a.jpg") as e:
        make_loader(tmp_path / "d").dataset[0]
    _one_line(e)


def test_images_of_different_sizes(tmp_path):
    _png(tmp_path / "d" / "c" / "a.png", _rgb(4, 4, 0))
    _png(tmp_path / "d" / "c" / "b.png", _rgb(5, 4, 0))
    with pytest.raises(DecomposeError, match="not all the same size") as e:
        list(make_loader(tmp_path / "d"))
    _one_line(e)


def test_not_a_folder_or_npz(tmp_path):
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(DecomposeError, match="neither a folder nor an .npz"):
        make_loader(tmp_path / "a.csv")


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "no array 'x'.*keys: images"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0])}, "2 integer labels"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0.5, 1.0])}, "integer labels"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, -1])}, "negative"),
    ({"x": np.full((2, 4, 4, 3), 2.0, np.float32), "y": np.array([0, 1])}, "outside \\[0, 1\\]"),
    ({"x": np.zeros((2, 4, 4, 5), np.uint8), "y": np.array([0, 1])}, "1 or 3 channels"),
    ({"x": np.zeros((2, 4), np.uint8), "y": np.array([0, 1])}, "has shape"),
])
def test_bad_npz(tmp_path, arrays, match):
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(DecomposeError, match=match) as e:
        make_loader(tmp_path / "b.npz")
    _one_line(e)


def test_unreadable_npz(tmp_path):
    (tmp_path / "b.npz").write_bytes(b"garbage")
    with pytest.raises(DecomposeError, match="cannot read"):
        make_loader(tmp_path / "b.npz")


# ---------------------------------------------------------------------- torchvision and shared
def test_torchvision_and_pil_paths_give_identical_tensors(tmp_path, monkeypatch):
    tvt = pytest.importorskip("torchvision.transforms",
                              reason="torchvision is not installed; the PIL path is the only one")
    for i, (h, w) in enumerate([(30, 40), (33, 33), (17, 50), (8, 8)]):
        _png(tmp_path / "d" / f"c{i}" / "a.png", _rgb(h, w, i))
    settings = [dict(), dict(resize=24), dict(crop=20), dict(resize=21, crop=20), dict(crop=40)]
    for kw in settings:
        monkeypatch.setattr(D.transforms, "_tvt", tvt)
        with_tv = [make_loader(tmp_path / "d", **kw).dataset[i][0] for i in range(4)]
        monkeypatch.setattr(D.transforms, "_tvt", None)
        without = [make_loader(tmp_path / "d", **kw).dataset[i][0] for i in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(with_tv, without)), kw


@pytest.mark.shared
@needs_cifar
def test_cifar_test_folder_reads_as_ten_classes_of_32x32():
    loader = make_loader(CIFAR_TEST, limit=64, batch_size=64)
    assert loader.dataset.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                      "frog", "horse", "ship", "truck"]
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 32, 32) and 0 <= int(y.min()) and int(y.max()) <= 9


def test_worker_errors_stay_one_line(tmp_path):
    path = tmp_path / "d" / "c" / "a.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a png")
    with pytest.raises(DecomposeError, match="a.png") as e:
        list(make_loader(tmp_path / "d", num_workers=1))
    _one_line(e)
    assert str(e.value).startswith("cannot read image")
