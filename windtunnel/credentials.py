"""Credentials in a tracking URI (`http://alice:s3cret@host:5000`) are never stored or shown.

`take(uri)` returns the URI without its user and password and hands them to MLflow the way it
reads them itself, through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in this process's
environment (the sweep's delivery process inherits it). Everything downstream (the study
journal, the tracking outbox and state, printed lines, exported configs, a child's command line)
sees only the clean URI. `windtunnel sync` run later, from another shell, reads the same two
variables: set them there (docs/safety.md).
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit


def take(uri: str | None) -> str | None:
    """uri without user:password@ (those go to MLflow's environment variables); else uri as is."""
    if not uri or "@" not in uri or "://" not in uri:
        return uri
    try:
        p = urlsplit(uri)
        user, password, host, port = p.username, p.password, p.hostname, p.port
    except ValueError:  # a bad port: check_tracking_uri names it; show nothing of it meanwhile
        return redact(uri)
    if user is None and password is None:
        return uri
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    host = f"[{host}]" if host and ":" in host else host or ""
    return urlunsplit(p._replace(netloc=host + (f":{port}" if port is not None else "")))


def redact(text: str) -> str:
    """text with the user:password@ of any URI in it replaced by ***@ (for messages)."""
    import re

    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
