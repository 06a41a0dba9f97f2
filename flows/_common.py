"""What every scheduled flow shares: its arguments and the exit codes a scheduler acts on.

    0  done, or the batch had already finished (reported; --force redoes it)
    1  a failure worth retrying: the MLflow server or Ray cluster unreachable, every training
       job failed, or anything unexpected (one line on stderr; a traceback on stdout for the
       unexpected)
    2  bad config or bad data (the reason names the key, column or series): do not retry
    3  another run of the same flow and batch holds the lock
    4  finished, but some training jobs failed (their series got the fallback forecast)
"""
from __future__ import annotations

import argparse
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED, EXIT_PARTIAL = 0, 1, 2, 3, 4


def parse(flow: str, doc: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m flows.{flow}", description=doc)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch-id", help="the batch (default: the data cutoff, 20240630T230000)")
    p.add_argument("--force", action="store_true", help="redo a batch that already finished")
    return p.parse_args(argv)


def run_flow(flow: str, doc: str, stages: tuple, argv: list[str] | None = None) -> int:
    """Parse the arguments, run the stages as one guarded batch, map the outcome to an exit
    code with a one-line reason."""
    from pipeline.batch import AlreadyDone, LockHeld
    from pipeline.cli import run_stages
    from pipeline.config import ConfigError
    from pipeline.errors import InfraError, PipelineError
    args = parse(flow, doc, argv)
    try:
        outcome = run_stages(args, stages, flow=flow)
    except AlreadyDone as e:
        print(f"skipped: {e}")
        return EXIT_OK
    except LockHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except InfraError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # noqa: BLE001 - a scheduler needs a code and a reason
        traceback.print_exc(file=sys.stdout)
        print(f"error: {flow} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if outcome.failed_jobs:
        print(f"warning: {len(outcome.failed_jobs)} training job(s) failed "
              f"({', '.join(outcome.failed_jobs[:5])}); their series got the fallback forecast",
              file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK
