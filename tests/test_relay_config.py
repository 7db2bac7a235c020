"""relay.config: RELAY_* variables, mirroring flags, and the errors for bad values."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load_config
from relay.timing import RelayTiming
from relay.wire.redis_config import RedisConfig

KEYS = "1:" + "ab" * 32
BASE = {"RELAY_KEYS": KEYS, "RELAY_TRANSCEIVERS": "127.0.0.1:7000"}


def test_defaults() -> None:
    config = load_config([], BASE)
    assert config.public == (("0.0.0.0", 3478),)
    assert (config.internal_host, config.internal_port) == ("127.0.0.1", 0)
    assert config.http == ("127.0.0.1", 9100)
    assert (config.route_idle_s, config.stun_rate, config.stun_burst) == (30.0, 20.0, 40.0)
    assert config.workers >= 1 and config.keys.current_id == 1


def test_environment_and_flags() -> None:
    environ = BASE | {
        "RELAY_PUBLIC": "127.0.0.1:3478, [::1]:3478",
        "RELAY_WORKERS": "3",
        "RELAY_TRANSCEIVERS": "127.0.0.1:7000,127.0.0.2:7001",
        "RELAY_ROUTE_IDLE_S": "12.5",
    }
    config = load_config(["--workers", "4", "--stun-rate", "5", "--internal-port", "9000"], environ)
    assert config.public == (("127.0.0.1", 3478), ("::1", 3478))
    assert config.transceivers == (("127.0.0.1", 7000), ("127.0.0.2", 7001))
    assert (config.workers, config.stun_rate, config.route_idle_s) == (4, 5.0, 12.5)
    assert config.internal_port == 9000


def test_v6_link() -> None:
    config = load_config(["--internal-host", "::1", "--transceivers", "[::1]:7000"], BASE)
    assert config.transceivers == (("::1", 7000),)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--public", "127.0.0.1:0"], "RELAY_PUBLIC: every public address needs a fixed port"),
        (["--public", "localhost:3478"], "RELAY_PUBLIC: 'localhost' is not an IP address"),
        (["--public", "3478"], "RELAY_PUBLIC: '3478' is not host:port"),
        (["--public", ","], "RELAY_PUBLIC: expected at least one host:port"),
        (["--http", "127.0.0.1:99999"], "RELAY_HTTP: port in '127.0.0.1:99999' is not 0..65535"),
        (["--workers", "two"], "RELAY_WORKERS: 'two' is not a number"),
        (["--workers", "0"], "RELAY_WORKERS: 0 is below 1"),
        (["--route-idle-s", "0"], "RELAY_ROUTE_IDLE_S: 0.0 is below 0.1"),
        (["--internal-host", "::1"], "RELAY_TRANSCEIVERS: 127.0.0.1:7000 is not reachable"),
        (["--transceivers", "127.0.0.1:0"], "RELAY_TRANSCEIVERS: 127.0.0.1:0 is not reachable"),
        (["--internal-port", "65535", "--workers", "2"], "RELAY_INTERNAL_PORT: 65535 + 2"),
        (["--keys", "1:" + "ab" * 31], "RELAY_KEYS: key 1 is shorter than 32 bytes"),
        (["--keys", "1:" + "00" * 32], "RELAY_KEYS: key 1 is all zeros (a placeholder)"),
        (["--keys", "1:CHANGE-ME"], "RELAY_KEYS: key 1 secret is not hex; generate one with"),
    ],
)
def test_bad_values(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(flags, BASE)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("missing", ["RELAY_KEYS", "RELAY_TRANSCEIVERS"])
def test_required(missing: str) -> None:
    environ = {k: v for k, v in BASE.items() if k != missing}
    flag = "--" + missing.removeprefix("RELAY_").lower()
    with pytest.raises(ConfigError, match=f"^{missing} \\(or {flag}\\) is required$"):
        load_config([], environ)


def test_transceivers_may_be_named_by_dns_names_kept_for_the_workers_to_look_up() -> None:
    """A headless Service's name stands for every transceiver pod; the workers look names up
    at run time (relay.discovery), so loading never resolves one and never fails on one that
    does not resolve yet."""
    environ = BASE | {
        "RELAY_TRANSCEIVERS": "Transceiver.voicerelay.svc:7000,127.0.0.2:7001,nowhere.invalid:9"
    }
    config = load_config(["--transceivers-refresh-s", "2"], environ)
    assert config.transceivers == (
        ("transceiver.voicerelay.svc", 7000),
        ("127.0.0.2", 7001),
        ("nowhere.invalid", 9),
    )
    assert config.timing.transceivers_refresh_s == 2.0
    assert config.timing.transceivers_grace_s == RelayTiming().transceivers_grace_s == 60.0
    v6 = load_config(["--internal-host", "::1", "--transceivers", "localhost:7000"], BASE)
    assert v6.transceivers == (("localhost", 7000),)  # looked up as IPv6 by the workers


@pytest.mark.parametrize(
    ("listed", "message"),
    [
        ("bad name:7000", "RELAY_TRANSCEIVERS: 'bad name' is neither an IP address nor a DNS"),
        ("a..b:7000", "RELAY_TRANSCEIVERS: 'a..b' is neither an IP address nor a DNS name"),
        ("-a.b:7000", "RELAY_TRANSCEIVERS: '-a.b' is neither an IP address nor a DNS name"),
        ("name.svc:0", "RELAY_TRANSCEIVERS: name.svc:0 is not reachable"),
        ("name.svc", "RELAY_TRANSCEIVERS: 'name.svc' is not host:port"),
    ],
)
def test_names_that_can_never_resolve_are_refused_at_start(listed: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], BASE | {"RELAY_TRANSCEIVERS": listed})
    assert str(caught.value).startswith(message)


def test_public_addresses_must_stay_ip_literals() -> None:
    with pytest.raises(ConfigError, match="RELAY_PUBLIC: 'localhost' is not an IP address"):
        load_config([], BASE | {"RELAY_PUBLIC": "localhost:3478"})


def test_timing_defaults_flags_and_limits() -> None:
    assert load_config([], BASE).timing == RelayTiming()
    environ = BASE | {"RELAY_HELLO_INTERVAL_S": "0.2", "RELAY_RESTART_MAX_S": "2"}
    timing = load_config(["--restart-first-s", "0.1", "--ready-timeout-s", "3"], environ).timing
    assert (timing.hello_interval_s, timing.ready_timeout_s) == (0.2, 3.0)
    assert (timing.restarts.first_s, timing.restarts.max_s) == (0.1, 2.0)
    with pytest.raises(ConfigError, match="RELAY_RESTART_MAX_S: 0.1 is below 0.5"):
        load_config(["--restart-max-s", "0.1"], BASE)
    with pytest.raises(ConfigError, match="RELAY_CLOCK_INTERVAL_S: 'x' is not a number"):
        load_config(["--clock-interval-s", "x"], BASE)


def test_route_cache_redis_is_read_as_the_transceivers_read_it() -> None:
    assert load_config([], BASE).redis is None
    redis = load_config(["--redis-url", "redis://r:6379/0"], BASE).redis
    assert redis == RedisConfig(
        url="redis://r:6379/0", connect_timeout_s=0.25, socket_timeout_s=0.25
    )
    environ = BASE | {"REDIS_SENTINELS": "s1:26379,s2:26379", "REDIS_SENTINEL_SERVICE": "main"}
    sentinel = load_config(["--redis-key-prefix", "vr"], environ).redis
    assert sentinel is not None and sentinel.sentinels == (("s1", 26379), ("s2", 26379))
    assert (sentinel.sentinel_service, sentinel.key_prefix) == ("main", "vr")
    old = BASE | {"RELAY_REDIS_URL": "redis://old:6379/0", "RELAY_REDIS_KEY_PREFIX": "p"}
    deprecated = load_config([], old).redis
    assert deprecated is not None and (deprecated.url, deprecated.key_prefix) == (
        "redis://old:6379/0",
        "p",
    )
    with pytest.raises(ConfigError, match="REDIS_URL: 'http://r' is not a redis://"):
        load_config(["--redis-url", "http://r"], BASE)
    with pytest.raises(ConfigError, match="REDIS_SENTINELS needs REDIS_SENTINEL_SERVICE"):
        load_config(["--redis-sentinels", "s1:26379"], BASE)
