"""MLflow tracking for sweeps and large runs: every call appends one record to an outbox; a child
process delivers it. A sweep or a run never waits for, or fails because of, a tracking server.

One module per job:
- outbox.py    the outbox file (<folder>/tracking/outbox.jsonl): append, read, find
- state.py     what was delivered where (state.json) and the deliverer's last error
- store.py     where records go: the local SQLite store (created whole), the client's settings
- delivery.py  one outbox to one MLflow URI, in order, nothing lost or duplicated
- tracker.py   the Tracker, the handle a sweep or run holds (appends; starts the deliverer)
- deliverer.py the Tracker's child process: delivers as records arrive, backs off while MLflow fails
- sync.py      `windtunnel sync`: deliver what was left, copy to another server, or drop a dead one
- sweep.py     a sweep's parent run and trials (and their replay by `report --mlflow`)
- large_run.py a large run's one MLflow run, metrics against tokens and system metrics
"""
