"""Prepare: the data stage alone — read, validate, arrays, windows, the validation report.
Untracked. `python -m flows.prepare --config configs/demo.yaml`"""
import sys

from flows._common import main
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch

TRACKED = False


def prepare(b: Batch) -> S.Outcome:
    """Read and validate the input; report what was repaired or skipped."""
    data = S.resolve(b, S.prepare(b))           # read, validate; the config for this data
    return S.html_report(b, S.Outcome(data))    # the batch's page, next to the outputs


if __name__ == "__main__":
    sys.exit(main(prepare, tracked=TRACKED))
