"""What every flow shares: its command line and the Batch it runs in. The exit codes a
scheduler acts on are `pipeline.errors`'s: 0 done (or already done), 1 retry, 2 bad config or
data, 3 locked, 4 some training jobs failed."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from pipeline.stages.batch import Batch
from pipeline.stages.steps import Outcome


def parser(flow: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m flows.{flow}", description=doc)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    if batch:
        p.add_argument("--batch-id", help="the batch (default: the data cutoff, "
                                          "e.g. 20240630T230000)")
        p.add_argument("--force", action="store_true", help="redo a batch that already finished")


def run_flow(flow: Callable[[Batch], Outcome], args: argparse.Namespace, *,
             record: bool = True, tracked: bool = True, registry: bool = False) -> Batch:
    """Run `flow(batch)` as one batch named after it; returns the finished Batch (its
    `exit_code`, and in `outcome` what the flow returned: None when it stopped early).
    `record`: a scheduled run (a finished batch is skipped; the CLI's commands pass False)."""
    with Batch(flow.__name__, args.config, args.set, getattr(args, "batch_id", None),
               getattr(args, "force", False), record=record, tracked=tracked,
               registry=registry) as b:
        b.outcome = flow(b)
    return b


def main(flow: Callable[[Batch], Outcome], argv: list[str] | None = None, **kwargs) -> int:
    """`python -m flows.<name>`: parse the command line, run the flow as a scheduled batch,
    return its exit code."""
    name = flow.__name__
    return run_flow(flow, parser(name, flow.__doc__).parse_args(argv), **kwargs).exit_code
