"""Shared pieces of the command line: the default-command group, error handling, options.

No tensor maths here: commands parse flags, build the objects a script would build, call the
library, and print.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import DecomposeError, first_line


class DefaultGroup(click.Group):
    """``decompose FILE ...`` runs the default command; ``decompose eval ...`` the others.

    User mistakes end as one line on stderr (``Error: ...``) with a non-zero exit, no traceback.
    """

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except DecomposeError as e:
            _fail(str(e), 1)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
            sys.exit(2)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            _fail(e.format_message().replace("\n", " ") + hint, 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 130)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except BrokenPipeError:
            sys.exit(1)
        except SystemExit as e:  # decompose never raises it inside a command: user code did
            _fail(f"code outside decompose (the model's, an --arch builder's or a module it "
                  f"imports) called sys.exit({e.code!r}); decompose stopped, nothing more was "
                  "written. Fix that code", 1)
        except RecursionError:
            _fail("the model or a file is nested too deeply (Python's recursion limit was "
                  "reached); use a model file of reasonable depth", 1)
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size, --limit or --input-shape", 1)
        except OSError as e:
            from ..io.write import _os_error
            where = e.filename if e.filename else "a file"
            _fail(str(_os_error(e, where, "use")), 1)
        except Exception as e:  # a bug, here or in the model's code: still one line
            if os.environ.get("DECOMPOSE_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__} ({first_line(e, 160)}); this is a bug in "
                  "decompose or in the model's own code: rerun with DECOMPOSE_DEBUG=1 to see "
                  "the traceback, and report it", 1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _fail(message: str, code: int) -> None:
    text = " ".join(message.split("\n")).strip()
    click.echo(f"Error: {text}", err=True)
    sys.exit(code)


def log(message: str, quiet: bool = False) -> None:
    """Progress and logs go to stderr, never stdout."""
    if not quiet:
        click.echo(message, err=True)


def emit(obj: Any, as_json: bool) -> None:
    """Results go to stdout: a table (``str(obj)``) or one JSON object."""
    if as_json:
        click.echo(json.dumps(obj.to_dict() if hasattr(obj, "to_dict") else obj, indent=2))
    else:
        click.echo(str(obj))


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise DecomposeError(f"--input-shape must be positive integers like 3,32,32, got {text!r}")
    return shape


def parse_number(text: str | None, flag: str, kind: type, example: str) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        word = "an integer" if kind is int else "a number"
        raise DecomposeError(f"{flag} must be {word}, got {text!r}; e.g. {flag} {example}") from None


def model_options(f: Callable) -> Callable:
    """--arch / --allow / --allow-function / --trust: how to read a model file safely."""
    f = click.option("--trust", is_flag=True,
                     help="Load with the full unpickler (runs code from the file). Only for "
                          "files you made yourself.")(f)
    f = click.option("--allow-function", "allow_functions", multiple=True,
                     metavar="MODULE:FUNCTION",
                     help="Let the file call this function while loading (repeatable). Only "
                          "for files whose author you trust; --allow covers classes.")(f)
    f = click.option("--allow", multiple=True, metavar="MODULE[:CLASS]",
                     help="Let the safe loader rebuild classes: every nn.Module class of "
                          "MODULE, or MODULE:CLASS (a class, never a function; repeatable).")(f)
    f = click.option("--arch", metavar="MODULE:FN",
                     help="Builder for a checkpoint / state_dict, e.g. "
                          "decompose.models.cifar_resnet:resnet20: MODULE is imported and FN "
                          "called (with key=literal arguments, FN(depth=56)); name only code "
                          "you trust.")(f)
    return f


def seed_option(f: Callable) -> Callable:
    """--seed S, an integer in [0, 2**32 - 1] (numpy's range)."""
    return click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0,
                        show_default=True, metavar="S",
                        help="Seed of the --limit subset (0 to 4294967295).")(f)


def positive(ctx, param, value):
    """click callback: an integer option that must be at least 1 (names the flag on error)."""
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


def rank_options(f: Callable) -> Callable:
    """How ranks are chosen, and which layers: the fields of DecomposeConfig."""
    opts = [
        click.option("--rank", "rank", metavar="T|full",
                     help="Keep T terms (the method's rank) per layer (integer >= 1), or 'full': "
                          "every layer at its exact rank even where that costs more (to check "
                          "that the model is reproduced). Default 1."),
        click.option("--energy", metavar="E",
                     help="Keep the fewest terms holding fraction E of each layer's squared "
                          "singular values, 0 < E <= 1."),
        click.option("--target-macs", metavar="F",
                     help="Global budget: decomposable layers keep fraction F (0<F<1) of their "
                          "multiply-adds; ranks minimise total kernel error."),
        click.option("--target-params", metavar="F",
                     help="The same budget on parameters."),
        click.option("--order", type=click.Choice(["auto", "dw-pw", "pw-dw"]), default="auto",
                     show_default=True, help="Network Decoupling's order: depthwise-then-"
                     "pointwise, the reverse, or per layer."),
        click.option("--include", multiple=True, metavar="GLOB",
                     help="Only convs whose name matches (repeatable), e.g. 'layer3.*'."),
        click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Leave convs whose name matches alone (repeatable), e.g. conv1."),
        click.option("--input-shape", metavar="C,H,W",
                     help="One input sample's shape, to count multiply-adds (C,L for 1-D "
                          "models, C,D,H,W for 3-D). Default: model.input_shape, else the "
                          "file's, else a size the model runs on, from its first conv (e.g. "
                          "C,224,224)."),
        click.option("--target-latency", metavar="F",
                     help="Latency budget: the model, timed here at --plan-batch, takes at most "
                          "fraction F (0<F<1) of the original; per-layer order/rank/form "
                          "minimise total kernel error (docs/speed.md)."),
    ]
    f = build_options(f)
    for o in reversed(opts):
        f = o(f)
    return f


def build_options(f: Callable) -> Callable:
    """How the chosen layers are built and timed, whatever picks their ranks: --fold-bn,
    --form, --latency-aware, --plan-batch, --plan-threads, --allocate, --channels-last. Part of
    :func:`rank_options`; ``decompose sweep`` applies them to every setting."""
    opts = [
        click.option("--method", default="nd", show_default=True, metavar="NAME[,NAME]|auto",
                     help="The factorization: " + _method_names() + "; 'auto' picks per layer "
                          "the method, variant and rank with the least error under a budget; a "
                          "comma list restricts auto (docs/methods.md)."),
        click.option("--method-seed", type=int, default=0, show_default=True, metavar="N",
                     help="Seed of iterative methods (CP's ALS), for reproducible results."),
        click.option("--fold-bn/--no-fold-bn", default=False, show_default=True,
                     help="Fold each BatchNorm that only reads a conv's output into that conv "
                          "before decoupling."),
        click.option("--form", type=click.Choice(["plain", "dw1", "auto", "fastest"]),
                     default="plain", show_default=True,
                     help="How decoupled layers are built: plain, dw1 (channel multiplier 1), "
                          "auto (cost-model rule) or fastest (timed); a layer whose best form "
                          "is the dense conv is kept original."),
        click.option("--latency-aware", is_flag=True,
                     help="Time every decoupled layer against its original on this machine and "
                          "keep the original where it is not 1.05x faster."),
        click.option("--plan-batch", type=int, default=1, show_default=True, metavar="N",
                     callback=positive,
                     help="Batch size at which the planner times layers (--latency-aware, "
                          "--form fastest, --target-latency)."),
        click.option("--plan-threads", type=int, metavar="N", callback=positive,
                     help="Torch threads while the planner times. Default: as set."),
        click.option("--allocate", "allocation", type=click.Choice(["kernel", "output"]),
                     default="kernel", show_default=True,
                     help="What a MACs, params or latency budget minimises: kernel errors (no "
                          "data) or output errors measured on the --calibrate images "
                          "(docs/method.md)."),
        click.option("--channels-last", is_flag=True,
                     help="Lay the model out channels_last (plan, time and save it so): convs "
                          "then run channels_last even on NCHW input, where depthwise convs are "
                          "fast on CPU. The report also times the original in that layout."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _method_names() -> str:
    from ..methods import names
    return ", ".join(names())


def build_fields(fold_bn=False, form="plain", latency_aware=False, plan_batch=1,
                 plan_threads=None, channels_last=False, allocation="kernel", method="nd",
                 method_seed=0) -> dict:
    """DecomposeConfig fields from :func:`build_options`' values (flag names -> field names)."""
    return dict(fold_bn=fold_bn, form=form, latency_aware=latency_aware,
                latency_batch=plan_batch, threads=plan_threads, channels_last=channels_last,
                allocation=allocation, method=method, seed=method_seed)


def config_from_options(rank, energy, target_macs, target_params, order, include, exclude,
                        input_shape, target_latency=None, **build):
    from ..config import DecomposeConfig
    return DecomposeConfig(
        rank="full" if rank == "full" else parse_number(rank, "--rank", int, "1"),
        energy=parse_number(energy, "--energy", float, "0.9"),
        target_macs=parse_number(target_macs, "--target-macs", float, "0.5"),
        target_params=parse_number(target_params, "--target-params", float, "0.5"),
        order=order, include=tuple(include), exclude=tuple(exclude),
        input_shape=parse_shape(input_shape),
        target_latency=parse_number(target_latency, "--target-latency", float, "0.5"),
        **build_fields(**build))


def pop_keys(d: dict, keys: list[str]) -> dict:
    return {k: d.pop(k) for k in keys if k in d}


BUILD_KEYS = ["fold_bn", "form", "latency_aware", "plan_batch", "plan_threads", "channels_last",
              "allocation", "method", "method_seed"]
RANK_KEYS = ["rank", "energy", "target_macs", "target_params", "order", "include", "exclude",
             "input_shape", "target_latency", *BUILD_KEYS]
