"""Where the experiments find ../shared's pretrained CIFAR ResNets and images (never copied into
the repository), and the one loader of the shipped ResNet-56 they share."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = SHARED / "models" / "cifar-resnet"
RESNET56 = MODELS / "resnet56.th"
ARCH56 = "decompose.models.cifar_resnet:resnet56"
TRAIN, TEST = SHARED / "data" / "cifar10" / "train", SHARED / "data" / "cifar10" / "test"


def load_resnet56(path: str | Path = RESNET56):
    """The shipped ResNet-56 (a bare state dict, so ``arch`` is given), through the safe loader
    the CLI uses; a file decompose wrote (``.pt``) loads without it. In eval mode."""
    from decompose.io.files import load_model
    path = Path(path)
    return load_model(path, arch=ARCH56 if path.suffix == ".th" else None).model.eval()
