"""Start-up failures are StartupError (Unavailable) and bad settings ConfigError
(InvalidArgument): one line each, with the OS or pydantic error kept as the cause."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentd.errors import Code, ConfigError, StartupError
from agentd.server.envoy import EnvoyProcess
from agentd.server.preflight import check_bind, check_state_store
from agentd.settings import load_settings


def test_start_up_and_config_errors_have_their_codes():
    assert StartupError("x").code is Code.UNAVAILABLE
    assert ConfigError("x").code is Code.INVALID_ARGUMENT
    import agentd.server

    assert agentd.server.StartupError is StartupError  # the names serve used still work
    assert agentd.server.ConfigError is ConfigError


@pytest.mark.parametrize("make", ["missing", "not_executable", "not_a_program"])
def test_envoy_that_cannot_run_is_a_startup_error(tmp_path: Path, make: str):
    envoy = tmp_path / "envoy"
    if make == "not_executable":
        envoy.write_bytes(b"\x7fELF")
    elif make == "not_a_program":
        envoy.write_bytes(b"\x00" * 64)
        envoy.chmod(0o755)
    process = EnvoyProcess(load_settings(port=0), envoy_path=envoy)
    with pytest.raises(StartupError, match=rf"^cannot run Envoy \({envoy}\): ") as caught:
        process.start(timeout=5)
    assert isinstance(caught.value.__cause__, OSError)
    assert "\n" not in caught.value.message
    assert not process.running
    # What start() prepared (the admin socket's folder, the drain pipe) is gone again.
    assert process._admin_dir is None and process._drain_notice is None


def test_a_port_in_use_is_a_startup_error_caused_by_the_os(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"^port {port} is in use") as caught:
            check_bind("127.0.0.1", port)
    assert isinstance(caught.value.__cause__, OSError)


def test_an_unusable_state_path_is_a_config_error_with_its_cause(tmp_path: Path):
    path = tmp_path / "state.db"
    path.write_bytes(b"not a database, just text" * 100)
    with pytest.raises(ConfigError, match="is not a SQLite database") as caught:
        check_state_store(path)
    assert caught.value.__cause__ is not None


def test_bad_settings_are_one_config_error_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AGENTD_PORT", "abc")
    monkeypatch.setenv("AGENTD_MAX_BODY_BYTES", "-1")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("port (AGENTD_PORT): ")
    assert "; max_body_bytes (AGENTD_MAX_BODY_BYTES): " in message
    assert isinstance(caught.value.__cause__, ValidationError)


def test_a_bad_config_file_is_a_config_error(tmp_path: Path):
    config = tmp_path / "agentd.yaml"
    config.write_text("port: [\n")
    with pytest.raises(ConfigError, match=f"config file {config} is not valid YAML") as caught:
        load_settings(config=config)
    assert "\n" not in caught.value.message
    assert caught.value.__cause__ is not None
    assert os.fspath(config) in caught.value.message
