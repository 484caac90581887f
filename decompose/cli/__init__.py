"""The ``decompose`` command: a thin click layer over the library (no tensor maths here)."""

from __future__ import annotations

import click

from ._common import DefaultGroup
from .compare import compare_cmd
from .demo import demo_cmd
from .eval import eval_cmd
from .export import export_cmd
from .finetune import finetune_cmd
from .run import report_cmd, run_cmd
from .sweep import sweep_cmd


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decompose", prog_name="decompose")
def cli() -> None:
    """Factor trained PyTorch convolutions into cheaper pieces (Network Decoupling by default).

    \b
    decompose MODEL --rank 1      factor MODEL (the default command, 'run')
    decompose report MODEL        the same report, nothing written
    decompose compare MODEL       every method at equal multiply-adds, side by side
    Run 'decompose COMMAND --help' for each command's options and examples.
    """


cli.add_command(run_cmd)
cli.add_command(report_cmd)
cli.add_command(demo_cmd)
cli.add_command(eval_cmd)
cli.add_command(sweep_cmd)
cli.add_command(compare_cmd)
cli.add_command(finetune_cmd)
cli.add_command(export_cmd)


def main() -> None:
    cli()
