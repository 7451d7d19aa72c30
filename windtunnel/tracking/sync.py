"""Catching up: deliver what a sweep's or a run's deliverer left in its outbox (`windtunnel sync`),
copy every record to another server (`sync --uri`), or stop waiting for a server gone for good
(`sync --drop`)."""
from __future__ import annotations

import logging
from pathlib import Path

from windtunnel.tracking.delivery import Delivery
from windtunnel.tracking.outbox import outbox_dirs, outbox_uris
from windtunnel.tracking.store import resolve_uri

log = logging.getLogger(__name__)


def drop_pending(tracking_dir: Path, uri: str, wait_lock_s: float = 60.0) -> int:
    """Stop waiting for `uri` (a server gone for good; as its records name it, or as `sync` prints
    it): its undelivered records count as handled. They stay in the outbox, and `sync --uri OTHER`
    can still copy them elsewhere. Returns how many."""
    from windtunnel.errors import ConfigError

    named = {u: u for u in outbox_uris(tracking_dir)} | {resolve_uri(tracking_dir, u): u
                                                          for u in outbox_uris(tracking_dir)}
    if uri not in named:
        raise ConfigError(f"--drop: {tracking_dir.parent}'s records go to no {uri!r} "
                          f"(allowed: {', '.join(repr(u) for u in dict.fromkeys(named.values()))})")
    d = Delivery(tracking_dir, named[uri], own_only=True)
    return d.run(wait_lock_s=wait_lock_s, drop=True)[1]


def sync_dir(tracking_dir: Path, uri: str | None, wait_lock_s: float = 60.0) -> tuple[int, int, dict[str, int], str | None]:
    """(sent, skipped for good, {resolved URI: pending records}, error) for one sweep's outbox.
    uri None: each record goes to the URI its sweep used; a uri: every record goes there."""
    if uri is not None:
        deliveries = [Delivery(tracking_dir, uri.strip(), own_only=False)]
    else:
        deliveries = [Delivery(tracking_dir, u, own_only=True) for u in outbox_uris(tracking_dir)]
    sent, pending = 0, {}
    error = None
    for d in deliveries:
        try:
            s, p = d.run(wait_lock_s=wait_lock_s)
            sent += s
        except Exception as e:  # noqa: BLE001
            error = f"{d.resolved_uri}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            p = d.pending()
        if p:
            pending[d.resolved_uri] = pending.get(d.resolved_uri, 0) + p
    return sent, sum(d.skipped for d in deliveries), pending, error


def sync(results_sweep_dir: Path, uri: str | None = None) -> tuple[int, int]:
    """Deliver a sweep's undelivered tracking records: (sent, still pending).

    uri None: each record goes to the URI its sweep used; a uri: every record goes there.
    results_sweep_dir may also be a results dir: every sweep in it is synced.
    """
    sent = pending = 0
    for d in outbox_dirs(results_sweep_dir):
        s, _, p, error = sync_dir(d, uri)
        if error:
            log.warning("sync %s: %s", d.parent, error)
        sent += s
        pending += sum(p.values())
    return sent, pending
