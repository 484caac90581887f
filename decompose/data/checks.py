"""Checks of data against a model: one sample's shape against the model's input shape."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DecomposeError


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
