"""A sweep in MLflow: one parent run per driver invocation (SweepTracking, which the driver
holds), each finished trial as its child run, or the study replayed after the fact
(`windtunnel report --mlflow`). Everything goes through the Tracker's outbox."""
from __future__ import annotations

from pathlib import Path

import optuna

from windtunnel.provenance import tags as provenance_tags
from windtunnel.results import counts_as_finished
from windtunnel.tracking.delivery import flat
from windtunnel.tracking.outbox import NAME
from windtunnel.tracking.tracker import Tracker

TS = optuna.trial.TrialState


def replicate_tags(attrs: dict) -> dict:
    """A replicate of `windtunnel confirm`: its configuration and seed index, as MLflow tags."""
    rep = attrs.get("replicate")
    return {"windtunnel.config": rep.get("label", rep["config"]), "windtunnel.seed_index": str(rep["seed"])} if rep else {}


def track_trial(tracker, parent: str, number: int, attempt: int, config: dict, result: dict,
                value: float | None, state: TS, tags: dict | None = None) -> None:
    """One trial as an MLflow child run: resolved params, the loss curve over tokens, final metrics.
    `objective` is what the study minimizes (sort the runs by it); a pruned trial ended as the
    pruner meant it to: FINISHED, tagged windtunnel.pruned (as KILLED, the UI showed it as a red ✗)."""
    final = {"objective": value, "final_val_loss": value} if value is not None else {}
    for key in ("tokens", "seconds", "tokens_per_s"):
        if isinstance(result.get(key), (int, float)):
            final[key] = result[key]
    tracker.log_trial(parent, number, attempt, params=flat(config), curve=result.get("curve", []),
                      metrics=final, status="FINISHED" if state in (TS.COMPLETE, TS.PRUNED) else "FAILED",
                      tags={"windtunnel.state": state.name, "windtunnel.pruned": str(state == TS.PRUNED).lower(),
                            "windtunnel.reason": str(result.get("reason", ""))[:500], **(tags or {})})


def untracked(study: optuna.Study, skip: set[tuple[int, int]] = frozenset()) -> list[optuna.trial.FrozenTrial]:
    """The study's finished trials but those whose (number, attempt) is in skip."""
    return [t for t in study.get_trials(deepcopy=False)
            if counts_as_finished(t) and (t.number, t.user_attrs.get("attempt", 1)) not in skip]


def track_finished(tracker, parent: str, study: optuna.Study, skip: set[tuple[int, int]] = frozenset()) -> None:
    """Every finished trial of the study as a child run of parent, but those (number, attempt) in skip."""
    for t in untracked(study, skip):
        track_trial(tracker, parent, t.number, t.user_attrs.get("attempt", 1), t.user_attrs.get("config", {}),
                    t.user_attrs.get("result", {}), t.value, t.state, replicate_tags(t.user_attrs))


def replay_to_mlflow(study: optuna.Study, sweep_dir: Path, uri: str = "") -> tuple[int, bool]:
    """Log a finished study's trials to MLflow after the fact (a sweep run with tracking off, e.g.
    on a GPU machine without MLflow): one parent run, a child run per finished trial that the
    server at uri does not hold or wait for yet (Tracker.logged_trials), so a replay run again,
    or after more trials finished, adds each trial once; with none new it logs nothing.
    Returns (trials replayed, every record for uri delivered)."""
    tracker = Tracker(uri, experiment=study.study_name, outbox=sweep_dir / "tracking" / NAME)
    skip = tracker.logged_trials()
    new = len(untracked(study, skip))
    if new:
        parent = tracker.start_invocation(params={"replayed_from": "study"}, tags={"windtunnel.sweep": study.study_name})
        track_finished(tracker, parent, study, skip)
        tracker.log_artifacts(parent, [p for p in sorted(sweep_dir.glob("*")) if p.suffix in (".png", ".md", ".yaml", ".csv")])
        tracker.finish_invocation(parent)
    # with nothing new this still retries what an earlier replay left waiting for this server
    ok = tracker.flush(timeout=300, until_error=True)  # a server that fails: its records wait for sync
    tracker.close()
    return new, ok


class SweepTracking:
    """A driver invocation's MLflow: ends as KILLED the invocations of drivers that died, opens a
    parent run when there is something to log (trials to run, or trials told but never tracked:
    a run with tracking off, or a driver killed between the two), then one child run per trial.
    cfg is the sweep's SweepConfig; population its trials per bundle (the driver's K)."""

    def __init__(self, cfg, sweep_dir: Path, study: optuna.Study, population: int, more_trials: bool):
        self.tracker = Tracker(cfg.tracking.uri, experiment=cfg.name, outbox=sweep_dir / "tracking" / NAME)
        self.tracker.end_unfinished()  # a killed driver's invocation: KILLED, not RUNNING for good
        self.parent = None
        skip = self.tracker.logged_trials()
        # a re-run of a complete sweep with nothing to log adds no parent run (each added an empty one)
        if more_trials or untracked(study, skip):
            self.parent = self.tracker.start_invocation(
                params={"n_trials": cfg.n_trials, "sampler": cfg.sampler.type, "pruner": cfg.pruner.type,
                        "executor": cfg.executor.type, "population": population},
                tags={"windtunnel.sweep": cfg.name, "windtunnel.sweep_dir": str(sweep_dir.resolve()),
                      **provenance_tags()})
            track_finished(self.tracker, self.parent, study, skip=skip)

    def trial(self, trial: optuna.trial.BaseTrial, result: dict, value: float | None, state: TS) -> None:
        """A trial just told to the study, as a child run."""
        track_trial(self.tracker, self.parent, trial.number, trial.user_attrs.get("attempt", 1),
                    trial.user_attrs.get("config", {}), result, value, state, replicate_tags(trial.user_attrs))

    def artifacts(self, files: list[Path]) -> None:
        """The sweep's report files (those that exist) on the parent run."""
        if self.parent is not None:
            self.tracker.log_artifacts(self.parent, [f for f in files if f.exists()])

    def finish(self, status: str = "FINISHED") -> None:
        """End the parent run: FINISHED, or KILLED when the driver was stopped (then delivered by
        the deliverer's last pass, after the driver exits)."""
        if self.parent is not None:
            self.tracker.finish_invocation(self.parent, status=status)

    def close(self, timeout: float = 20.0) -> str | None:
        """Wait at most `timeout` s for delivery and stop the deliverer. None when every record was
        delivered; else the line to print (they wait for `windtunnel sync`)."""
        try:
            return None if self.tracker.flush(timeout=timeout) else self.tracker.undelivered()
        finally:
            self.tracker.close()
