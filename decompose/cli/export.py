"""``decompose export MODEL --onnx OUT.onnx``: write ONNX / torch.export (``.pt2``) / TorchScript
files, checked, and time them in onnxruntime against the original model."""

from __future__ import annotations

import contextlib
import os

import click

from ..engine.trace import infer_input_shape
from ..errors import DecomposeError
from ..io.files import check_writable, load_model
from ..io.write import protect_inputs
from ..measure.clock import CLOCKS, speedups
from ._common import emit, log, model_options, parse_number, parse_shape


class ExportReport:
    """What ``decompose export`` did: the files written, and latencies when compared."""

    def __init__(self, model: str, input_shape, source: str) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.source = source
        self.exports: list = []
        self.latency: dict | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "input_shape": list(self.input_shape),
                "input_shape_source": self.source,
                "exports": [e.to_dict() for e in self.exports], "latency": self.latency}

    def __str__(self) -> str:
        shape = ",".join(map(str, self.input_shape))
        lines = [f"{self.model}: input shape {shape} ({self.source})", "",
                 f"{'format':<12} {'max abs err':>11} {'max rel err':>11} {'tolerance':>9}  "
                 f"{'batches':<7} file"]
        for e in self.exports:
            how = e.exporter + (f", opset {e.opset}" if e.opset else "")
            if e.max_abs_err is None:
                errs = f"{'-':>11} {'-':>11} {'-':>9}"
            else:
                errs = f"{e.max_abs_err:>11.2e} {e.max_rel_err:>11.2e} {e.tolerance:>9.0e}"
            batches = ",".join(map(str, e.checked_batches)) or "-"
            lines.append(f"{e.format:<12} {errs}  {batches:<7} {e.path}  [{how}]")
        if self.latency:
            lat = self.latency
            lines += ["", f"onnxruntime latency, batch {lat['batch_size']}, "
                          f"{lat['threads']} intra-op thread(s), {lat['rounds']} alternating "
                          f"rounds, {lat['clock']} clock, median [quartiles]:"]
            for name, r in lat["models"].items():
                speed = "" if name == "original" else f"  {r['speedup']:.2f}x vs original"
                lines.append(f"  {name:<11} {r['median_ms']:9.3f} ms  "
                             f"[{r['q1_ms']:.3f} - {r['q3_ms']:.3f}]{speed}")
        return "\n".join(lines)


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--onnx", "onnx_out", type=click.Path(), metavar="OUT.onnx",
              help="Write an ONNX file, checked in onnxruntime against PyTorch.")
@click.option("--pt2", "pt2_out", type=click.Path(), metavar="OUT.pt2",
              help="Write a torch.export program (torch.export.export + torch.export.save), "
                   "loaded back with torch.export.load and checked against PyTorch.")
@click.option("--torchscript", "ts_out", type=click.Path(), metavar="OUT.pt",
              help="Write a TorchScript file (torch.jit.trace), checked against PyTorch. "
                   "TorchScript is deprecated in the PyTorch used here; prefer --pt2.")
@click.option("--input-shape", metavar="C,H,W",
              help="One input sample's shape. Default: model.input_shape, else the file's.")
@click.option("--batch-size", default="1", show_default=True, metavar="N",
              help="Batch of the example input used to export, check and time.")
@click.option("--opset", metavar="N", help="ONNX opset. Default 17 (18 with --dynamo).")
@click.option("--dynamo", is_flag=True,
              help="Use torch's torch.export-based ONNX exporter (needs onnxscript) instead of "
                   "the TorchScript-based one.")
@click.option("--static-batch", is_flag=True,
              help="Fix the batch axis to --batch-size (default: dynamic).")
@click.option("--script", is_flag=True,
              help="TorchScript by torch.jit.script instead of trace (keeps control flow).")
@click.option("--tolerance", default="1e-4", show_default=True, metavar="TOL",
              help="Largest allowed max|export - torch| / max|torch| on seeded random input.")
@click.option("--no-check", is_flag=True,
              help="Do not run the written files (onnxruntime is then not needed).")
@click.option("--compare", metavar="ORIGINAL", type=click.Path(dir_okay=True),
              help="Also time ORIGINAL (e.g. the model before decomposing) and the exported "
                   "model in onnxruntime, side by side.")
@click.option("--threads", metavar="N",
              help="onnxruntime intra-op threads for --compare. Default: torch's thread count.")
@click.option("--repeats", default="30", show_default=True, metavar="N",
              help="Alternating timing rounds for --compare.")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="--compare's clock: wall time, or the CPU time of the timing thread (needs "
                   "--threads 1; other processes' load does not inflate it).")
@model_options
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def export_cmd(model: str, onnx_out, pt2_out, ts_out, input_shape, batch_size, opset, dynamo,
               static_batch, script, tolerance, no_check, compare, threads, repeats, clock, arch,
               allow, allow_functions, trust, force, as_json, quiet) -> None:
    """Export MODEL (e.g. a decomposed file) to ONNX, a torch.export program (.pt2) and/or
    TorchScript (deprecated in the PyTorch used here; kept for libtorch users).

    Each file is checked before it is written: onnxruntime (torch.export.load, torch.jit.load)
    runs it on seeded random input and its outputs must match PyTorch's within --tolerance,
    else nothing is written. Existing files are only replaced with --force.

    \b
    Examples:
      decompose export r20.decomposed.pt --onnx r20.onnx
      decompose export r20.decomposed.pt --onnx r20.onnx --pt2 r20.pt2
      decompose export r20.decomposed.pt --onnx r20.onnx --batch-size 64 \\
          --compare resnet20.th --arch decompose.models.cifar_resnet:resnet20
    """
    if not onnx_out and not ts_out and not pt2_out:
        raise DecomposeError("nothing to write; give --onnx OUT.onnx, --pt2 OUT.pt2 and/or "
                             "--torchscript OUT.pt")
    if compare and not onnx_out:
        raise DecomposeError("--compare times ONNX files; give --onnx OUT.onnx too")
    if compare and no_check:
        raise DecomposeError("--compare runs onnxruntime; leave out --no-check")
    batch = parse_number(batch_size, "--batch-size", int, "1")
    opset_n = parse_number(opset, "--opset", int, "17")
    if opset_n is not None and opset_n < 7:
        raise DecomposeError(f"--opset must be >= 7, got {opset_n}; e.g. --opset 17")
    tol = parse_number(tolerance, "--tolerance", float, "1e-4")
    n_threads = parse_number(threads, "--threads", int, "2")
    rounds = parse_number(repeats, "--repeats", int, "30")
    if batch < 1:
        raise DecomposeError(f"--batch-size must be >= 1, got {batch}")
    if not tol > 0:
        raise DecomposeError(f"--tolerance must be > 0, got {tolerance}; e.g. --tolerance 1e-4")
    if n_threads is not None and n_threads < 1:
        raise DecomposeError(f"--threads must be >= 1, got {n_threads}")
    if rounds < 1:
        raise DecomposeError(f"--repeats must be >= 1, got {rounds}")
    if clock == "cpu" and n_threads != 1:
        raise DecomposeError("--clock cpu reads the timing thread's CPU time, which covers the "
                             "whole graph only with one intra-op thread; add --threads 1")
    shape_given = parse_shape(input_shape)
    with protect_inputs(model, compare):
        _export(model, onnx_out, pt2_out, ts_out, shape_given, batch, opset_n, dynamo, static_batch,
                script, tol, no_check, compare, n_threads, rounds, clock,
                dict(arch=arch, allow=allow, allow_functions=allow_functions, trust=trust),
                force, as_json, quiet)


def _export(model, onnx_out, pt2_out, ts_out, shape_given, batch, opset_n, dynamo, static_batch, script,
            tol, no_check, compare, n_threads, rounds, clock, how, force, as_json, quiet) -> None:
    from ..io import export as ex

    # fail before any work: outputs, packages
    outs = {"--onnx": onnx_out, "--pt2": pt2_out, "--torchscript": ts_out}
    for out in outs.values():
        if out:
            check_writable(out, force)
    given = [(flag, os.path.realpath(out)) for flag, out in outs.items() if out]
    for i, (flag, real) in enumerate(given):
        for other, real2 in given[i + 1:]:
            if real == real2:
                raise DecomposeError(f"{flag} and {other} name the same file; give two names")
    if onnx_out:
        ex.require_onnx(dynamo)
        if not no_check:
            ex.require_onnxruntime()

    loaded = load_model(model, **how)
    log(f"loaded {model} ({loaded.kind}, {type(loaded.model).__name__})", quiet)
    original = None
    if compare:  # read before anything is written: a bad --compare file writes nothing
        original = load_model(compare, **how)
        log(f"loaded {compare} ({original.kind})", quiet)
    shape, source = infer_input_shape(loaded.model, shape_given, loaded.meta)
    report = ExportReport(model, shape, source)
    common = dict(input_shape=shape, batch_size=batch, check=not no_check, tolerance=tol,
                  force=force)
    with contextlib.ExitStack() as stack:
        orig = None
        if original is not None:
            log(f"exporting {compare} to a temporary ONNX file", quiet)
            orig = stack.enter_context(ex.temporary_onnx(
                original.model, shape, batch_size=batch, opset=opset_n,
                dynamic_batch=not static_batch, dynamo=dynamo, tolerance=tol))
        if onnx_out:
            res = ex.export_onnx(loaded.model, onnx_out, opset=opset_n,
                                 dynamic_batch=not static_batch, dynamo=dynamo, **common)
            report.exports.append(res)
            log(f"wrote {res.path}", quiet)
        if pt2_out:
            res = ex.export_pt2(loaded.model, pt2_out, dynamic_batch=not static_batch, **common)
            report.exports.append(res)
            log(f"wrote {res.path}", quiet)
        if ts_out:
            res = ex.export_torchscript(loaded.model, ts_out,
                                        method="script" if script else "trace", **common)
            report.exports.append(res)
            log(f"wrote {res.path}", quiet)
        if orig is not None:
            log(f"timing in onnxruntime: {rounds} alternating rounds", quiet)
            name = "decomposed" if loaded.kind == "decomposed" else "model"
            lat = ex.onnx_latency({"original": orig.path, name: onnx_out}, shape,
                                  batch_size=batch, threads=n_threads, repeats=rounds,
                                  timer=CLOCKS[clock])
            base = lat["original"]
            up = speedups(lat, "original")
            report.latency = {
                "batch_size": batch, "threads": base.threads, "rounds": rounds, "clock": clock,
                "runtime": "onnxruntime CPUExecutionProvider",
                "models": {n: {**r.to_dict(), "speedup": up[n]} for n, r in lat.items()}}
    emit(report, as_json)
