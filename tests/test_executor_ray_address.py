"""executor=ray with no executor.address joins RAY_ADDRESS when it is set (inside `ray job submit`),
instead of a private one-node instance. No Ray instance is started here: ray.init is replaced."""
import socket

import pytest

from windtunnel.errors import ConfigError
from windtunnel.executors import ray as ray_executor
from windtunnel.config.sweep import ExecutorConfig


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray_init(monkeypatch):
    """ray.init records its address instead of starting or joining anything."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: calls.append(address))
    monkeypatch.setattr(ray_executor.RayExecutor, "_capacity", lambda self: 1)
    monkeypatch.setattr(ray_executor, "_token_auth_like_ray_start", lambda: None)
    return calls


def test_empty_address_joins_ray_address(monkeypatch, no_ray_init):
    """Catches RAY_ADDRESS ignored: ray.init(address='local') would start a private instance, and a
    sweep submitted to a cluster would silently run on one node."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        ray_executor.RayExecutor(ExecutorConfig(type="ray", address=""))
    assert no_ray_init == [address]


def test_explicit_address_wins_and_no_address_is_local(monkeypatch, no_ray_init):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_executor.cluster_address(ExecutorConfig(type="ray", address="auto")) == ("auto", "executor.address")
    monkeypatch.delenv("RAY_ADDRESS")
    ray_executor.RayExecutor(ExecutorConfig(type="ray", address=""))
    assert no_ray_init == ["local"]


def test_ray_address_nobody_answers_is_one_line_naming_it(monkeypatch, no_ray_init):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS: no Ray cluster answers at .*unset RAY_ADDRESS"):
        ray_executor.RayExecutor(ExecutorConfig(type="ray", address=""))
    assert no_ray_init == []
