"""The default input shape (from the first conv, checked by running the model) and messages that
blame the input shape only when the shape is the problem."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import decompose
from decompose import DecomposeError
from decompose.engine.trace import infer_input_shape, is_shape_error, trace


class RawAudio(nn.Module):
    """Takes (N, L) samples and adds the channel axis itself (Wav2Vec2's feature encoder)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 10, stride=5)
        self.conv2 = nn.Conv1d(8, 8, 3)

    def forward(self, x):
        return self.conv2(self.conv(x[:, None]).relu())


class FixedFrames(nn.Module):
    """Takes exactly 3000 frames of 80 mel bins and says so (the Whisper encoder)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(80, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1)

    def forward(self, x):
        if x.shape[-1] != 3000:
            raise ValueError(f"expects the mel input features to be of length 3000, but found "
                             f"{x.shape[-1]}")
        return self.conv2(self.conv1(x).relu())


class Volume(nn.Module):
    """A 3-D classifier whose head fixes the volume to 32^3 (4 channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 2, 3, padding=1)
        self.head = nn.Linear(2 * 32 ** 3, 3)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, mask):
        return self.conv(x) * mask


@pytest.mark.parametrize("model,shape", [
    (RawAudio(), (1024,)),
    (FixedFrames(), (80, 3000)),       # the length named in the model's own error
    (nn.Sequential(nn.Conv1d(2, 4, 3)), (2, 1024)),
    (Volume(), (4, 32, 32, 32)),
    (nn.Sequential(nn.Conv3d(2, 4, 3)), (2, 16, 112, 112)),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 224, 224)),
])
def test_default_shape_is_one_the_model_runs_on(model, shape):
    assert infer_input_shape(model) == (shape, "default")
    rep = decompose.plan(model, rank=1)
    assert rep.input_shape == shape and rep.input_shape_source == "default"


def test_a_model_no_guess_fits_gets_the_flag_for_its_dimension():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(7, 2))
    with pytest.raises(DecomposeError, match=r"--input-shape C,L") as e:
        infer_input_shape(model)
    assert "cannot guess" in str(e.value) and "\n" not in str(e.value)
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(), nn.Linear(7, 2))
    with pytest.raises(DecomposeError, match=r"--input-shape C,D,H,W"):
        infer_input_shape(model)


def test_a_failure_that_is_not_about_the_shape_does_not_blame_it():
    with pytest.raises(DecomposeError, match="missing 1 required positional argument") as e:
        infer_input_shape(TwoInputs())
    assert "--input-shape" not in str(e.value)
    with pytest.raises(DecomposeError, match="TypeError") as e:
        trace(TwoInputs(), (3, 8, 8))
    assert "--input-shape" not in str(e.value)


def test_a_shape_mismatch_while_tracing_names_the_flag_and_the_cause():
    with pytest.raises(DecomposeError, match=r"--input-shape C,H,W") as e:
        trace(nn.Sequential(nn.Conv2d(3, 4, 3)), (5, 8, 8))
    assert "expected input" in str(e.value) and "channels" in str(e.value)


def test_shape_errors_are_told_apart():
    assert is_shape_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x4 and 5x2)"))
    assert is_shape_error(ValueError("expects the mel input features to be of length 3000"))
    assert not is_shape_error(TypeError("forward() missing 1 required positional argument"))
    assert not is_shape_error(RuntimeError("Expected all tensors to be on the same device"))


def test_cli_decomposes_a_raw_audio_model_without_an_input_shape(tmp_path):
    from decompose.cli import cli
    torch.save(RawAudio(), tmp_path / "a.pt")
    res = CliRunner().invoke(cli, [str(tmp_path / "a.pt"), "--rank", "1", "--no-latency",
                                   "--allow", "test_input_shape", "-q"])
    assert res.exit_code == 0, res.stderr
    assert "input shape 1024 (default)" in res.stdout
