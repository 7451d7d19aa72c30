"""The local Ray instance `executor=ray` starts requires a token made for it (Ray's GCS listens
on every interface): a client without it is refused, and the token is never printed."""
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_the_private_ray_instance_refuses_a_client_without_its_token(tmp_path, monkeypatch, capfd):
    """The mutant: ray.init(address='local') without _require_token accepts the stranger."""
    import ray

    from windtunnel.executors.ray import RayExecutor
    from windtunnel.config.sweep import ExecutorConfig

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    ex = RayExecutor(ExecutorConfig(type="ray", workers=1))
    try:
        token = os.environ["RAY_AUTH_TOKEN"]
        gcs = ray.get_runtime_context().gcs_address
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42  # the owner's own tasks run
        stranger_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
        stranger = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('JOINED', ray.cluster_resources())"],
            env=stranger_env, capture_output=True, text=True, timeout=180)
        assert "JOINED" not in stranger.stdout and stranger.returncode != 0, stranger.stdout + stranger.stderr[-2000:]
    finally:
        ex.close()
    assert "RAY_AUTH_TOKEN" not in os.environ  # gone with the instance
    out, err = capfd.readouterr()
    assert token not in out + err
