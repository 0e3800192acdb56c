"""The environment's bad values: each one refused at start in one line naming the variable."""

from __future__ import annotations

import pytest

from gateway.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "WORKER_CONCURRENCY",
            "nan",
            "WORKER_CONCURRENCY must be a whole number from 1 to 1000, not 'nan'",
        ),
        (
            "WORKER_CONCURRENCY",
            "2.5",
            "WORKER_CONCURRENCY must be a whole number from 1 to 1000, not '2.5'",
        ),
        (
            "DATABASE_POOL_SIZE",
            "1e9",
            "DATABASE_POOL_SIZE must be a whole number from 2 to 1000, not '1e9'",
        ),
        (
            "UNLEASH_REFRESH_SECONDS",
            "inf",
            "UNLEASH_REFRESH_SECONDS must be a whole number from 1 to 3600, not 'inf'",
        ),
        (
            "JETSTREAM_REPLICAS",
            "7",
            "JETSTREAM_REPLICAS must be a whole number from 1 to 5, not '7'",
        ),
        (
            "JETSTREAM_ACK_WAIT_SECONDS",
            "1e30",
            "JETSTREAM_ACK_WAIT_SECONDS must be between 1 and 3600, not '1e30'",
        ),
        (
            "SANDBOX_WEBHOOK_DELAY_SECONDS",
            "nan",
            "SANDBOX_WEBHOOK_DELAY_SECONDS must be between 0 and 3600, not 'nan'",
        ),
        (
            "SANDBOX_FAIL_DELAY_SECONDS",
            "-1",
            "SANDBOX_FAIL_DELAY_SECONDS must be between 0 and 3600, not '-1'",
        ),
        (
            "WAIT_FOR_SCHEMA_SECONDS",
            "soon",
            "WAIT_FOR_SCHEMA_SECONDS must be a number, not 'soon'",
        ),
        (
            "LOG_LEVEL",
            "verbose",
            "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'verbose'",
        ),
        (
            # A typo must not pass for "not production" and let the sandbox run there.
            "DEPLOYMENT_ENV",
            "prod",
            "DEPLOYMENT_ENV must be one of development, staging, production, not 'prod'",
        ),
        (
            "NATS_NAMESPACE",
            "a b",
            "NATS_NAMESPACE must be empty or dot-terminated tokens of letters, digits, _ and -"
            " (e.g. 'test1.'), not 'a b'",
        ),
        (
            "NATS_URL",
            "nats://n1:4222,http://n2:4222",
            "NATS_URL must be nats:// or tls:// URLs separated by commas,"
            " not 'nats://n1:4222,http://n2:4222'",
        ),
        (
            "NATS_NAMESPACE",
            "team",
            "NATS_NAMESPACE must be empty or dot-terminated tokens of letters, digits, _ and -"
            " (e.g. 'test1.'), not 'team'",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({name: value})
    assert str(raised.value) == message


def test_good_values_are_read_in_their_canonical_form() -> None:
    settings = load_settings(
        {
            "WORKER_CONCURRENCY": " 64 ",
            "JETSTREAM_ACK_WAIT_SECONDS": "2.5",
            "LOG_LEVEL": "warning",
            "DEPLOYMENT_ENV": "Staging",
            "NATS_NAMESPACE": "t1.blue.",
            "NATS_URL": "nats://n1:4222, nats://n2:4222",
        }
    )
    assert settings.nats_url == "nats://n1:4222, nats://n2:4222"
    assert settings.worker_concurrency == 64
    assert settings.ack_wait_seconds == 2.5
    assert settings.log_level == "WARNING"
    assert settings.deployment_env == "staging"
    assert settings.nats_namespace == "t1.blue."


def test_defaults_need_no_environment() -> None:
    settings = load_settings({})
    assert (settings.worker_concurrency, settings.log_level, settings.deployment_env) == (
        32,
        "INFO",
        "development",
    )
    assert settings.nats_namespace == ""


def test_urls_with_a_trailing_slash_still_make_routable_paths() -> None:
    """The sandbox's own URLs are built from PUBLIC_URL / SANDBOX_URL: no "//" in them."""
    settings = load_settings({"PUBLIC_URL": "http://gw.example:8080/", "SANDBOX_ENABLED": "true"})
    assert settings.public_url == "http://gw.example:8080"
    assert settings.core_url == "http://gw.example:8080/sandbox/core"
    assert (
        settings.providers["sbx_ok"].base_url == "http://gw.example:8080/sandbox/providers/sbx_ok"
    )
    explicit = load_settings({"SANDBOX_URL": "http://sbx.example/sandbox/", "SANDBOX_ENABLED": "1"})
    assert explicit.core_url == "http://sbx.example/sandbox/core"


def test_warn_is_warning() -> None:
    assert load_settings({"LOG_LEVEL": "warn"}).log_level == "WARNING"
