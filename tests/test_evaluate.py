"""decompose.measure.evaluate: exact metrics on controlled logits, the model/data checks, a real ResNet-20."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decompose.data import make_loader
from decompose.errors import DecomposeError
from decompose.measure.evaluate import EvalResult, evaluate
from decompose.models import resnet20

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CKPT = SHARED / "models" / "cifar-resnet" / "resnet20.th"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test"
needs_shared = pytest.mark.skipif(not CKPT.exists() or not CIFAR_TEST.is_dir(),
                                  reason="../shared (ResNet-20 weights, CIFAR-10 JPEGs) is absent")


class Passthrough(nn.Module):
    """Returns its input as logits, so a test chooses the logits directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _batches(logits: torch.Tensor, labels: torch.Tensor, size: int = 3):
    return [(logits[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def test_metrics_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 8, (20,), generator=g)
    res = evaluate(Passthrough(), _batches(logits, labels), progress=False)
    top5 = logits.topk(5, dim=1).indices
    assert res.n == 20 and res.k == 5
    assert res.top1 == int((logits.argmax(1) == labels).sum()) / 20
    assert res.top5 == int((top5 == labels[:, None]).any(1).sum()) / 20
    assert math.isclose(res.loss, F.cross_entropy(logits, labels).item(), rel_tol=1e-6)
    assert set(res.to_dict()) == {"top1", "top5", "loss", "n", "k", "seconds"}
    assert isinstance(res, EvalResult)


def test_top5_uses_all_classes_when_fewer_than_five():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    res = evaluate(Passthrough(), [(logits, torch.tensor([2, 0]))], progress=False)
    assert res.k == 3 and res.top1 == 0.0 and res.top5 == 1.0


def test_eval_mode_inside_and_training_mode_restored():
    seen = []

    class Spy(Passthrough):
        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return x

    m = Spy().train()
    evaluate(m, [(torch.zeros(2, 4), torch.tensor([0, 1]))], progress=False)
    assert seen == [(False, True)] and m.training


def test_progress_goes_to_stderr_never_stdout(capsys):
    evaluate(Passthrough(), [(torch.zeros(2, 4), torch.tensor([0, 1]))], progress=True)
    assert capsys.readouterr().out == ""


@pytest.fixture
def npz(tmp_path) -> Path:
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 3, 4, 1]))
    return tmp_path / "d.npz"


class Tiny(nn.Sequential):
    def __init__(self, classes: int, shape=(3, 8, 8)):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))
        self.input_shape = shape


def test_runs_on_make_loader(npz):
    res = evaluate(Tiny(5), make_loader(npz, batch_size=4), progress=False)
    assert res.n == 6 and 0.0 <= res.top1 <= res.top5 <= 1.0 and res.loss > 0


def test_labels_beyond_the_model_outputs(npz):
    with pytest.raises(DecomposeError, match="label 4 but the model has only 4 outputs"):
        evaluate(Passthrough(), [(torch.zeros(2, 4), torch.tensor([0, 4]))], progress=False)
    with pytest.raises(DecomposeError, match="5 classes but the model has only 3 outputs"):
        evaluate(Tiny(3), make_loader(npz), progress=False)


def test_image_shape_other_than_the_model_expects(npz):
    with pytest.raises(DecomposeError, match="8x8 pixels but the model expects 32x32") as e:
        evaluate(Tiny(5, shape=(3, 32, 32)), make_loader(npz), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(DecomposeError, match="1 channel"):
        evaluate(Tiny(5), make_loader(npz, grayscale=True), progress=False)


def test_model_failing_on_the_data_is_one_line(npz):
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())  # expects 1 channel, no input_shape
    with pytest.raises(DecomposeError, match="model failed on a batch of shape") as e:
        evaluate(m, make_loader(npz), progress=False)
    assert "\n" not in str(e.value)


def test_unlabeled_data_and_empty_data(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DecomposeError, match="no labels"):
        evaluate(Tiny(2, (3, 4, 4)), make_loader(tmp_path / "u.npz", labels_required=False),
                 progress=False)
    with pytest.raises(DecomposeError, match="no samples"):
        evaluate(Passthrough(), [], progress=False)


# Reported: 81.0% top-1 on all 10,000 JPEG test images (measured again by
# experiments/eval_cifar.py: 81.03%). A seeded random subset of n images has a binomial standard
# error sqrt(p (1 - p) / n) = 1.75 points at n = 500; 4 standard errors (7.0 points) would be
# exceeded by chance with probability ~6e-5. The subset is fixed by its seed, so the test is
# deterministic; the tolerance says how far a correct pipeline can honestly land.
N_SUBSET = 500
REPORTED = 0.81
TOL = 4 * math.sqrt(REPORTED * (1 - REPORTED) / N_SUBSET)


@pytest.mark.shared
@needs_shared
def test_pretrained_resnet20_on_a_seeded_cifar_subset():
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    model = resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
    loader = make_loader(CIFAR_TEST, limit=N_SUBSET, seed=0, batch_size=250)
    res = evaluate(model, loader, progress=False)
    assert res.n == N_SUBSET
    assert abs(res.top1 - REPORTED) <= TOL, f"top-1 {res.top1:.3f}, expected {REPORTED}±{TOL:.3f}"
    assert res.top5 >= res.top1
