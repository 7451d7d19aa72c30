"""A sweep's trials in MLflow: each finished trial as a child run of the driver's invocation
(live, through windtunnel.tracking's outbox), or replayed after the fact from the study."""
from __future__ import annotations

from pathlib import Path

import optuna

from windtunnel.results import counts_as_finished
from windtunnel.tracking import _flat

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
    tracker.log_trial(parent, number, attempt, params=_flat(config), curve=result.get("curve", []),
                      metrics=final, status="FINISHED" if state in (TS.COMPLETE, TS.PRUNED) else "FAILED",
                      tags={"windtunnel.state": state.name, "windtunnel.pruned": str(state == TS.PRUNED).lower(),
                            "windtunnel.reason": str(result.get("reason", ""))[:500], **(tags or {})})


def _untracked(study: optuna.Study, skip: set[tuple[int, int]] = frozenset()) -> list[optuna.trial.FrozenTrial]:
    """The study's finished trials but those whose (number, attempt) is in skip."""
    return [t for t in study.get_trials(deepcopy=False)
            if counts_as_finished(t) and (t.number, t.user_attrs.get("attempt", 1)) not in skip]


def track_finished(tracker, parent: str, study: optuna.Study, skip: set[tuple[int, int]] = frozenset()) -> None:
    """Every finished trial of the study as a child run of parent, but those (number, attempt) in skip."""
    for t in _untracked(study, skip):
        track_trial(tracker, parent, t.number, t.user_attrs.get("attempt", 1), t.user_attrs.get("config", {}),
                    t.user_attrs.get("result", {}), t.value, t.state, replicate_tags(t.user_attrs))


def replay_to_mlflow(study: optuna.Study, sweep_dir: Path, uri: str = "") -> tuple[int, bool]:
    """Log a finished study's trials to MLflow after the fact (a sweep run with tracking off, e.g.
    on a GPU machine without MLflow): one parent run, a child run per finished trial that the
    server at uri does not hold or wait for yet (Tracker.logged_trials), so a replay run again,
    or after more trials finished, adds each trial once; with none new it logs nothing.
    Returns (trials replayed, every record for uri delivered)."""
    from windtunnel.tracking import Tracker

    tracker = Tracker(uri, experiment=study.study_name, outbox=sweep_dir / "tracking" / "outbox.jsonl")
    skip = tracker.logged_trials()
    new = len(_untracked(study, skip))
    if new:
        parent = tracker.start_invocation(params={"replayed_from": "study"}, tags={"windtunnel.sweep": study.study_name})
        track_finished(tracker, parent, study, skip)
        tracker.log_artifacts(parent, [p for p in sorted(sweep_dir.glob("*")) if p.suffix in (".png", ".md", ".yaml", ".csv")])
        tracker.finish_invocation(parent)
    # with nothing new this still retries what an earlier replay left waiting for this server
    ok = tracker.flush(timeout=300, until_error=True)  # a server that fails: its records wait for sync
    tracker.close()
    return new, ok
