"""transceiver.config: environment, mirrored flags, and errors naming the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.wire.redis_config import RedisConfig, redis_flags, with_flags
from relay.wire.ufrag import Keyring
from transceiver.__main__ import main
from transceiver.config import ConfigError, TransceiverConfig
from transceiver.http.auth import AuthConfig, AuthConfigError, Authenticator, AuthError, auth_flags
from transceiver.realtime.limits import RealtimeLimits
from transceiver.restarts import RestartPolicy
from transceiver.store.survival import SurvivalPolicy
from transceiver.webrtc.link_policy import LinkPolicy

KEYS = "1:" + "5b" * 32
ROOT = Path(__file__).resolve().parents[1]


def test_defaults_environment_and_flags() -> None:
    config = TransceiverConfig.load([], {"TRANSCEIVER_KEYS": KEYS})
    assert config.link == ("127.0.0.1", 7000) and config.http == ("127.0.0.1", 8080)
    assert (config.capacity, config.agent) == (100, "pipeline")
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_CAPACITY": "5", "TRANSCEIVER_LINK": "[::1]:7001"}
    config = TransceiverConfig.load(["--capacity", "7", "--public", "1.2.3.4:3478,[::1]:3479"], env)
    assert config.capacity == 7 and config.link == ("::1", 7001)
    assert config.public == (("1.2.3.4", 3478), ("::1", 3479))
    flags = ["--connect-timeout-s", "2.5", "--drain-timeout-s", "0"]
    config = TransceiverConfig.load(flags, env)
    assert (config.connect_timeout_s, config.drain_timeout_s) == (2.5, 0.0)
    assert config.gc_freeze and not TransceiverConfig.load(["--gc-freeze", "0"], env).gc_freeze
    dtx_off = {**env, "TRANSCEIVER_CALLER_DTX": "0"}
    assert config.caller_dtx and not TransceiverConfig.load([], dtx_off).caller_dtx


def test_survival_policy_from_environment_and_flags() -> None:
    assert TransceiverConfig.load([], {"TRANSCEIVER_KEYS": KEYS}).survival == SurvivalPolicy()
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_LEASE_S": "2", "TRANSCEIVER_RESTART_MAX_S": "4"}
    flags = ["--max-pending-writes", "9", "--restart-failing-after", "5"]
    survival = TransceiverConfig.load(flags, env).survival
    assert (survival.lease_s, survival.max_pending_writes) == (2.0, 9)
    assert survival.restarts == RestartPolicy(max_s=4.0, failing_after_crashes=5)
    with pytest.raises(ConfigError, match="TRANSCEIVER_RESTART_MAX_S=0.1 is below 0.5"):
        TransceiverConfig.load(["--restart-max-s", "0.1"], {"TRANSCEIVER_KEYS": KEYS})
    with pytest.raises(ConfigError, match="TRANSCEIVER_HEALTH_INTERVAL_S='x' is not a float"):
        TransceiverConfig.load(["--health-interval-s", "x"], {"TRANSCEIVER_KEYS": KEYS})
    images = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_SESSION_IMAGE_BYTES": "1000"}
    assert TransceiverConfig.load([], images).survival.session_image_bytes == 1000
    flag = ["--session-image-bytes", "0"]  # none kept: a resume shows the words only
    assert TransceiverConfig.load(flag, images).survival.session_image_bytes == 0
    with pytest.raises(ConfigError, match="TRANSCEIVER_SESSION_IMAGE_BYTES=-1 is below 0"):
        TransceiverConfig.load(["--session-image-bytes", "-1"], {"TRANSCEIVER_KEYS": KEYS})


def test_link_policy_from_environment_and_flags() -> None:
    assert TransceiverConfig.load([], {"TRANSCEIVER_KEYS": KEYS}).link_policy == LinkPolicy()
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_LINK_HEARD_WINDOW_S": "0.5"}
    flags = ["--link-keyed-ttl-s", "5", "--link-max-rechecks", "0", "--link-read-interval-s", "0"]
    policy = TransceiverConfig.load(flags, env).link_policy
    assert policy == LinkPolicy(
        heard_window_s=0.5, keyed_ttl_s=5.0, max_rechecks=0, read_interval_s=0.0
    )
    with pytest.raises(ConfigError, match="TRANSCEIVER_LINK_MAX_TRANSACTIONS=0 is below 1"):
        TransceiverConfig.load(["--link-max-transactions", "0"], {"TRANSCEIVER_KEYS": KEYS})
    with pytest.raises(ValueError, match="link policy: keyed_ttl_s must be above 0"):
        LinkPolicy(keyed_ttl_s=0)


def test_realtime_limits_from_environment_and_flags() -> None:
    assert TransceiverConfig.load([], {"TRANSCEIVER_KEYS": KEYS}).realtime == RealtimeLimits()
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_REALTIME_LOST_NOTICE_S": "0"}
    limits = TransceiverConfig.load(["--realtime-max-pending-events", "8"], env).realtime
    assert limits == RealtimeLimits(lost_notice_s=0.0, max_pending_events=8)
    env["TRANSCEIVER_REALTIME_MAX_PENDING_EVENTS"] = "0"
    with pytest.raises(ConfigError, match="TRANSCEIVER_REALTIME_MAX_PENDING_EVENTS=0 is below 1"):
        TransceiverConfig.load([], env)
    with pytest.raises(ConfigError, match="TRANSCEIVER_REALTIME_LOST_NOTICE_S=-1 is below 0.0"):
        TransceiverConfig.load(["--realtime-lost-notice-s", "-1"], {"TRANSCEIVER_KEYS": KEYS})
    with pytest.raises(ValueError, match="realtime limits: lost_notice_s must be 0 or above"):
        RealtimeLimits(lost_notice_s=-1)


def test_the_delta_window_from_environment_and_flags() -> None:
    assert RealtimeLimits().delta_coalesce_ms == 50.0
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_REALTIME_DELTA_COALESCE_MS": "0"}
    assert TransceiverConfig.load([], env).realtime.delta_coalesce_ms == 0.0
    flags = ["--realtime-delta-coalesce-ms", "20"]
    assert TransceiverConfig.load(flags, env).realtime.delta_coalesce_ms == 20.0
    env["TRANSCEIVER_REALTIME_DELTA_COALESCE_MS"] = "-5"
    with pytest.raises(ConfigError, match="TRANSCEIVER_REALTIME_DELTA_COALESCE_MS=-5 is below 0"):
        TransceiverConfig.load([], env)
    env["TRANSCEIVER_REALTIME_DELTA_COALESCE_MS"] = "soon"
    with pytest.raises(ConfigError, match="TRANSCEIVER_REALTIME_DELTA_COALESCE_MS"):
        TransceiverConfig.load([], env)
    with pytest.raises(ValueError, match="realtime limits: delta_coalesce_ms must be 0 or above"):
        RealtimeLimits(delta_coalesce_ms=-1)


def test_the_forward_timeout_from_environment_and_flags() -> None:
    assert TransceiverConfig.load([], {"TRANSCEIVER_KEYS": KEYS}).forward_timeout_s == 10.0
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_FORWARD_TIMEOUT_S": "3"}
    assert TransceiverConfig.load([], env).forward_timeout_s == 3.0
    assert TransceiverConfig.load(["--forward-timeout-s", "2.5"], env).forward_timeout_s == 2.5
    with pytest.raises(ConfigError, match="TRANSCEIVER_FORWARD_TIMEOUT_S=0 is below 0.1"):
        TransceiverConfig.load(["--forward-timeout-s", "0"], env)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "TRANSCEIVER_KEYS (--keys) is required"),
        (["--keys", "zz"], "TRANSCEIVER_KEYS: key entry 'zz' is not ID:HEXSECRET"),
        (["--keys", "1:" + "00" * 32], "TRANSCEIVER_KEYS: key 1 is all zeros (a placeholder)"),
        (["--keys", "1:" + "5b" * 16], "TRANSCEIVER_KEYS: key 1 is shorter than 32 bytes"),
        (["--keys", KEYS, "--capacity", "0"], "TRANSCEIVER_CAPACITY=0 is below 1"),
        (["--keys", KEYS, "--capacity", "many"], "TRANSCEIVER_CAPACITY='many' is not a int"),
        (["--keys", KEYS, "--link", "localhost:7000"], "'localhost' is not an IP address"),
        (["--keys", KEYS, "--http", "127.0.0.1"], "TRANSCEIVER_HTTP='127.0.0.1' is not host:port"),
        (["--keys", KEYS, "--public", "1.2.3.4:1,5.6.7.8:2"], "give one address per family"),
        (["--keys", KEYS, "--public", "1.2.3.4:0"], "port 0 cannot be advertised"),
        (["--keys", KEYS, "--gc-freeze", "yes"], "TRANSCEIVER_GC_FREEZE='yes' is not 0 or 1"),
        (["--keys", KEYS, "--caller-dtx", "on"], "TRANSCEIVER_CALLER_DTX='on' is not 0 or 1"),
        (
            ["--keys", KEYS, "--agent", "parrot"],
            "TRANSCEIVER_AGENT='parrot' is not one of pipeline, echo",
        ),
    ],
)
def test_errors_name_the_setting(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TransceiverConfig.load(flags, {})


def test_help_lists_every_flag_including_auth(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])  # no keys, no API key: help is shown before anything is validated
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--auth", "--insecure-dev", "--link", "--keys", "--drain-timeout-s"):
        assert flag in shown, flag


def test_auth_flags_win_over_the_environment() -> None:
    flags, rest = auth_flags().parse_known_args(["--insecure-dev", "--capacity", "3"])
    assert rest == ["--capacity", "3"]
    assert AuthConfig.from_flags(flags, {"TRANSCEIVER_AUTH": "required"}).mode == "off"
    required, _ = auth_flags().parse_known_args(["--auth", "required"])
    with pytest.raises(AuthConfigError, match="TRANSCEIVER_API_KEY is not set"):
        AuthConfig.from_flags(required, {"TRANSCEIVER_AUTH": "off"})


def test_redis_flags_win_over_the_variables_and_leave_the_rest() -> None:
    """Parsed as ``python -m transceiver`` parses them: the Redis flags first, the rest after."""
    argv = ["--redis-url", "redis://flag:6379/0", "--capacity", "3", "--redis-key-prefix", "f"]
    redis_args, rest = redis_flags().parse_known_args(argv)
    assert TransceiverConfig.load(rest, {"TRANSCEIVER_KEYS": KEYS}).capacity == 3
    environ = {"REDIS_URL": "redis://env:6379/0", "REDIS_KEY_PREFIX": "e", "REDIS_MAX_ITEMS": "7"}
    redis = RedisConfig.from_env(with_flags(redis_args, environ))
    assert redis is not None and (redis.url, redis.key_prefix) == ("redis://flag:6379/0", "f")
    assert redis.max_items == 7  # a variable no flag overrode still counts


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({}, ["--redis-sentinels", "x:1"], "REDIS_SENTINELS needs REDIS_SENTINEL_SERVICE"),
        (
            {"REDIS_URL": "redis://env:6379/0"},
            ["--redis-sentinels", "x:1", "--redis-sentinel-service", "main"],
            "set exactly one of REDIS_URL and REDIS_SENTINELS",
        ),
        ({}, ["--redis-sentinels", "x"], "REDIS_SENTINELS: 'x' is not host:port"),
    ],
)
def test_a_bad_redis_flag_stops_the_transceiver_naming_the_variable(
    env: dict[str, str], flags: list[str], message: str
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSCEIVER_", "REDIS_"))}
    argv = [sys.executable, "-m", "transceiver", "--keys", KEYS, "--agent", "echo"]
    result = subprocess.run(
        [*argv, "--insecure-dev", *flags],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"transceiver: {message}" in result.stderr
    assert "ready" not in result.stdout


SECRET_KEYS = "2:" + "c4" * 32 + ",1:" + "c5" * 32
API_KEY = "vr-config-test-key"


def test_secret_keys_are_their_own_keyring() -> None:
    config = AuthConfig.validated("required", API_KEY, SECRET_KEYS)
    assert config.secret_keys is not None and config.secret_keys.current_id == 2
    config.check_apart_from(Keyring.parse(KEYS))
    with pytest.raises(AuthConfigError, match="reuses a secret of TRANSCEIVER_KEYS"):
        config.check_apart_from(Keyring.parse("7:" + "c5" * 32))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, "TRANSCEIVER_SECRET_KEYS is not set: ek_ client secrets are signed with"),
        ("  ", "TRANSCEIVER_SECRET_KEYS is not set"),
        ("1:" + "00" * 32, "TRANSCEIVER_SECRET_KEYS: key 1 is all zeros (a placeholder)"),
        ("1:" + "c4" * 31, "TRANSCEIVER_SECRET_KEYS: key 1 is shorter than 32 bytes"),
        ("c4", "TRANSCEIVER_SECRET_KEYS: key entry 'c4' is not ID:HEXSECRET"),
    ],
)
def test_auth_required_needs_a_strong_secret_keyring(spec: str | None, message: str) -> None:
    with pytest.raises(AuthConfigError, match=re.escape(message)):
        AuthConfig.validated("required", API_KEY, spec)


async def test_auth_off_without_secret_keys_signs_with_a_key_of_its_own() -> None:
    config = AuthConfig.validated("off", None, None)
    assert config.secret_keys is None
    first, second = Authenticator(config), Authenticator(config)
    secret = await first.mint(60, None)
    assert first.verify_secret(secret.value).expires_at == secret.expires_at
    with pytest.raises(AuthError, match="signature"):
        second.verify_secret(secret.value)
    with pytest.raises(AuthConfigError, match="TRANSCEIVER_SECRET_KEYS: key 1 is all zeros"):
        AuthConfig.validated("off", None, "1:" + "00" * 32)  # checked whenever it is set


def test_workers_and_cpu_budget() -> None:
    config = TransceiverConfig.load([], {"TRANSCEIVER_KEYS": KEYS})
    assert (config.workers, config.cpu_budget_cores, config.cpu_window_s) == (1, 0.85, 10.0)
    env = {"TRANSCEIVER_KEYS": KEYS, "TRANSCEIVER_WORKERS": "auto"}
    config = TransceiverConfig.load(["--cpu-budget-cores", "0", "--cpu-window-s", "3"], env)
    assert (config.workers, config.cpu_budget_cores, config.cpu_window_s) == (0, 0.0, 3.0)
    assert TransceiverConfig.load(["--workers", "4"], env).workers == 4
    with pytest.raises(ConfigError, match="TRANSCEIVER_WORKERS=0 is below 1"):
        TransceiverConfig.load(["--workers", "0"], env)
    with pytest.raises(ConfigError, match="TRANSCEIVER_WORKERS=256 is above 255"):
        TransceiverConfig.load(["--workers", "256"], env)
    with pytest.raises(ConfigError, match="TRANSCEIVER_CPU_BUDGET_CORES=-1 is below 0.0"):
        TransceiverConfig.load(["--cpu-budget-cores", "-1"], env)
