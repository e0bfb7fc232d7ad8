import pytest

from agentd.errors import ConfigError
from agentd.settings import load_settings


def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch):
    config = tmp_path / "agentd.yaml"
    config.write_text("port: 9000\nhost: 127.0.0.2\nauth-tokens: [a]\n")
    assert load_settings(config=config).port == 9000
    monkeypatch.setenv("AGENTD_PORT", "9100")
    settings = load_settings(config=config)
    assert (settings.port, settings.host, settings.auth_tokens) == (9100, "127.0.0.2", ["a"])
    assert load_settings(config=config, port=9200).port == 9200


def test_config_file_from_env(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("max_body_bytes: 10\n")
    monkeypatch.setenv("AGENTD_CONFIG", str(config))
    assert load_settings().max_body_bytes == 10


def test_tokens_from_comma_list(monkeypatch):
    monkeypatch.setenv("AGENTD_AUTH_TOKENS", "x, y,")
    assert load_settings().auth_tokens == ["x", "y"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"http3": True}, "http3 needs TLS"),
        ({"tls_cert": "c.pem"}, "given together"),
        ({"port": 70000}, "less than or equal"),
    ],
)
def test_invalid_settings(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(**flags)


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(config=listy)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config=tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(config=unknown)


def test_config_file_with_non_string_keys(tmp_path):
    config = tmp_path / "k.yaml"
    config.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="setting names must be strings, not 1"):
        load_settings(config=config)
    config.write_text("port: 9000\ntrue: 1\n")
    with pytest.raises(ConfigError, match="setting names must be strings"):
        load_settings(config=config)
