"""The main job: validate -> windows -> train before the cutoffs -> backtest against the
baselines -> train on all data -> forecast -> write. `python -m flows.run --config
configs/demo.yaml` (`python -m pipeline run` is this flow, run again whenever asked)."""
import sys

from flows._common import main
from pipeline.stages import forecast as F
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch


def run(b: Batch) -> S.Outcome:
    """Backtest the models, then forecast with the final model."""
    data = S.prepare(b)                          # read, validate
    data = S.resolve(b, data)                    # the config for this data; open the batch
    jobs = S.plan(b, data)                       # one global job, or one per group
    inits = S.warm_start(b, data, jobs)          # champions' weights (train.warm_start)
    trained = S.train(b, data, jobs, inits)      # before the backtest cutoffs
    scored = S.backtest(b, data, jobs, trained, inits)   # against the baselines; written
    final = S.final_model(b, data, jobs, trained, inits)  # on all the data (or reused)
    S.log_models(b, final)
    forecast = F.forecast(b, data, jobs, final, scored.calibration,  # conformal widths,
                          scored.selection)       # each group's candidate by its backtest
    F.write_forecast(b, data, forecast, scored)
    return S.html_report(b, S.Outcome(data, jobs, inits, trained, scored, final,
                                    forecast=forecast))   # the page, next to the outputs


if __name__ == "__main__":
    sys.exit(main(run))
