"""Session fixtures: the simulated Bedrock upstream and the mantlegate proxy in front of it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import SECRETS, UPSTREAM_KEY, Process, Proxy, mantlegate_bin, proxy_config


# The SDK reads OPENAI_PROJECT_ID, OPENAI_BASE_URL, ... and its HTTP client reads HTTP(S)_PROXY:
# none of them may change what a test sends, or send loopback traffic through a proxy.
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy"}


@pytest.fixture(scope="session", autouse=True)
def _clean_client_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("OPENAI_") or name.lower() in _PROXY_VARS:
                mp.delenv(name)
        yield


@pytest.fixture(scope="session")
def binary() -> Path:
    path = mantlegate_bin()
    if not path.is_file():
        pytest.exit(f"mantlegate binary not found at {path}: run `cargo build` or set MANTLEGATE_BIN", 2)
    return path


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["MANTLEGATE_LOG"] = "info"  # the access log is at info
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def simulator(binary: Path) -> Iterator[str]:
    """Address (host:port) of `mantlegate simulate`."""
    proc = Process(
        "simulator",
        [str(binary), "simulate", "--listen", "127.0.0.1:0", "--event-delay-ms", "5"],
        env=_child_env(),
    )
    try:
        yield proc.wait_listening()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def proxy(binary: Path, simulator: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("mantlegate")
    config = workdir / "mantlegate.toml"
    ledger = workdir / "ledger.db"
    config.write_text(proxy_config(simulator, ledger))
    proc = Process(
        "proxy",
        [str(binary), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
        env=_child_env(BEDROCK_API_KEY=UPSTREAM_KEY),
    )
    try:
        yield Proxy(proc, proc.wait_listening(), ledger)
    finally:
        code = proc.stop()
    # After a started session only: also covers what the proxy printed while shutting down.
    leaked = [(s, line) for line in proc.all_output() for s in SECRETS if s in line]
    assert not leaked, f"proxy output contains secrets: {leaked}"
    assert code == 0, f"proxy exited with {code} after SIGTERM:\n" + "\n".join(proc.raw_stderr)
