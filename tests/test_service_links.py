"""Kubernetes service-link variables are ignored; misspelt settings are still errors."""

from __future__ import annotations

import pytest

from postroom.errors import ConfigError
from postroom.settings import Settings, is_service_link

URL = "postgresql+asyncpg://app:pw@db.internal:5432/app"

# What the kubelet injects for Services named `postroom` and `postroom-health` (named
# port "http"), in the docker-links format, IPv4 and IPv6.
INJECTED = {
    "POSTROOM_SERVICE_HOST": "10.96.0.12",
    "POSTROOM_SERVICE_PORT": "9000",
    "POSTROOM_PORT": "tcp://10.96.0.12:9000",
    "POSTROOM_PORT_9000_TCP": "tcp://10.96.0.12:9000",
    "POSTROOM_PORT_9000_TCP_PROTO": "tcp",
    "POSTROOM_PORT_9000_TCP_PORT": "9000",
    "POSTROOM_PORT_9000_TCP_ADDR": "10.96.0.12",
    "POSTROOM_HEALTH_SERVICE_HOST": "fd00::1:12",
    "POSTROOM_HEALTH_SERVICE_PORT": "9000",
    "POSTROOM_HEALTH_SERVICE_PORT_HTTP": "9000",
    "POSTROOM_HEALTH_PORT": "tcp://[fd00::1:12]:9000",
    "POSTROOM_HEALTH_PORT_9000_TCP": "tcp://[fd00::1:12]:9000",
    "POSTROOM_HEALTH_PORT_9000_TCP_PROTO": "tcp",
    "POSTROOM_HEALTH_PORT_9000_TCP_PORT": "9000",
    "POSTROOM_HEALTH_PORT_9000_TCP_ADDR": "fd00::1:12",
    "POSTROOM_METRICS_PORT_53_UDP": "udp://10.96.0.13:53",
}


def test_injected_service_links_are_ignored():
    settings = Settings.from_env({"POSTROOM_DATABASE_URL": URL, **INJECTED})
    assert settings.health_port is None  # the default (per role), not the Service's tcp:// URL
    assert all(is_service_link(key, value) for key, value in INJECTED.items())


def test_a_real_setting_of_the_same_name_is_read():
    # The container's own env (the ConfigMap) overrides the injected link of the same name.
    settings = Settings.from_env(
        {"POSTROOM_DATABASE_URL": URL, **INJECTED, "POSTROOM_HEALTH_PORT": "9100"}
    )
    assert settings.health_port == 9100


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("POSTROOM_HEALTH_PORTT", "9000"),  # a typo, whatever its value
        ("POSTROOM_HEALTH_PORTT", "tcp://10.0.0.1:9000"),
        ("POSTROOM_HELTH_PORT", "9000"),  # service-link name shape, setting-like value
        ("POSTROOM_RELAY_SERVICE_HOST", "relay.example"),  # links carry IPs, not names
        ("POSTROOM_RELAY_SERVICE_PORT", "http"),
        ("POSTROOM_PORT_9000_TCP_PROTO", "http"),
        ("POSTROOM_SERVICE_HOSTS", "10.0.0.1"),
    ],
)
def test_lookalikes_are_still_unknown_settings(key, value):
    assert not is_service_link(key, value)
    with pytest.raises(ConfigError, match=f"unknown setting {key}"):
        Settings.from_env({"POSTROOM_DATABASE_URL": URL, key: value})


def test_a_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"\(did you mean POSTROOM_HEALTH_PORT\?\)"):
        Settings.from_env({"POSTROOM_DATABASE_URL": URL, "POSTROOM_HEALTH_PORTT": "9000"})
