"""The rate limits' pure parts: token-bucket arithmetic, OpenAI's header shapes, the client
address behind trusted proxies, whose key a request is, and the settings."""

from __future__ import annotations

import ipaddress

import pytest

from transceiver.config import ConfigError, TransceiverConfig
from transceiver.http.rate_limiting import (
    ANONYMOUS,
    RateLimited,
    client_address,
    duration,
    key_subject,
    refusal_headers,
)
from transceiver.store.rate_limits import RateLimit, bucket_key, refilled, taken

PER_MINUTE = RateLimit("requests", 60, 60.0)  # one a second
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def test_a_bucket_refills_at_its_rate_and_never_past_full() -> None:
    assert refilled(0.0, 1000, 60, 60_000) == 1.0
    assert refilled(0.0, 30_000, 60, 60_000) == 30.0
    assert refilled(59.5, 10_000, 60, 60_000) == 60.0
    assert refilled(-10.0, 5_000, 60, 60_000) == -5.0  # a debt (tokens spent) pays back too
    assert refilled(3.0, -500, 60, 60_000) == 3.0  # a clock that went back adds nothing


def test_taking_from_a_full_bucket_leaves_one_less_and_a_reset_of_one_interval() -> None:
    state = taken(60.0, 1, PER_MINUTE)
    assert (state.allowed, state.remaining, state.reset_ms, state.retry_after_ms) == (
        True,
        59,
        1000,
        0,
    )


def test_an_empty_bucket_refuses_and_says_when_the_cost_is_there() -> None:
    state = taken(0.25, 1, PER_MINUTE)
    assert not state.allowed
    assert state.remaining == 0
    assert state.retry_after_ms == 750  # 0.75 of a unit at one a second
    assert state.reset_ms == 59_750  # nothing taken: full after 59.75 units


def test_spending_may_go_below_zero_and_the_reset_counts_the_debt() -> None:
    tokens = RateLimit("tokens", 100, 60.0)
    state = taken(40.0, 90, tokens, spend=True)
    assert state.allowed and state.remaining == 0
    assert state.reset_ms == 90_000  # 150 tokens to full at 100 a minute


def test_a_burst_of_the_limit_is_taken_then_refused() -> None:
    limit = RateLimit("sessions", 3, 30.0)
    level = 3.0
    answers = []
    for _ in range(4):
        state = taken(level, 1, limit)
        level -= 1 if state.allowed else 0
        answers.append(state.allowed)
    assert answers == [True, True, True, False]
    assert taken(level, 1, limit).retry_after_ms == 10_000


def test_durations_are_openais_format() -> None:
    assert duration(0) == "0ms"
    assert duration(12) == "12ms"
    assert duration(1500) == "1.5s"
    assert duration(20_000) == "20s"
    assert duration(360_000) == "6m0s"
    assert duration(61_250) == "1m1.25s"


def test_a_refusal_is_openais_429_with_its_headers() -> None:
    requests = taken(0.0, 1, PER_MINUTE)
    sessions = taken(5.0, 1, RateLimit("sessions", 10, 60.0))
    refusal = RateLimited([requests, sessions])
    response = refusal.response()
    assert response.status_code == 429
    body = response.body.decode()
    assert '"type":"requests"' in body and '"code":"rate_limit_exceeded"' in body
    assert '"param":null' in body
    headers = refusal_headers([requests, sessions])
    assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1000"
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["x-ratelimit-remaining-sessions"] == "4"
    assert dict(response.headers)["retry-after"] == "1"


def test_tokens_refusal_says_tokens() -> None:
    state = taken(-5.0, 1, RateLimit("tokens", 100, 60.0))
    assert '"type":"tokens"' in RateLimited([state]).response().body.decode()


def test_the_peer_is_the_client_unless_it_is_a_trusted_proxy() -> None:
    spoofed = "203.0.113.9"
    assert client_address("198.51.100.7", spoofed, TRUSTED) == "198.51.100.7"
    assert client_address("198.51.100.7", spoofed, ()) == "198.51.100.7"
    assert client_address("10.1.2.3", None, TRUSTED) == "10.1.2.3"
    assert client_address(None, spoofed, TRUSTED) == "unknown"


def test_behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client() -> None:
    # The client may put anything on the left; only what trusted proxies appended counts.
    forwarded = "1.1.1.1, 203.0.113.9, 10.0.0.5"
    assert client_address("10.0.0.1", forwarded, TRUSTED) == "203.0.113.9"
    assert client_address("10.0.0.1", "fd00::1, 10.9.9.9", TRUSTED) == "fd00::1"
    assert client_address("fd00::2", "2001:db8::1", TRUSTED) == "2001:db8::1"


def test_an_unreadable_hop_makes_the_proxy_the_client() -> None:
    assert client_address("10.0.0.1", "203.0.113.9, not-an-ip", TRUSTED) == "10.0.0.1"


def test_a_client_secret_counts_as_the_api_key_that_minted_it() -> None:
    api_key = "sk-voicerelay-test-0123456789"
    assert key_subject("ek_abc.def", api_key) == key_subject(api_key, api_key)
    assert key_subject("other-key-0123456789", api_key) != key_subject(api_key, api_key)
    assert key_subject(None, api_key) == ANONYMOUS
    assert key_subject("ek_abc.def", None) == ANONYMOUS
    assert api_key not in key_subject(api_key, api_key)  # the key itself is never stored


def test_bucket_keys_share_one_slot_and_refuse_odd_subjects() -> None:
    assert bucket_key("vr", "requests", "key-ab") == "vr:ratelimit:{ratelimit}:requests:key-ab"
    with pytest.raises(ValueError, match="whitespace"):
        bucket_key("vr", "requests", "a b")


BASE = {"TRANSCEIVER_KEYS": "1:" + "ab" * 32}


def test_the_limits_are_settings_off_by_default() -> None:
    config = TransceiverConfig.load([], BASE)
    assert not config.rate_limits.enabled
    env = {
        **BASE,
        "TRANSCEIVER_RATE_LIMIT_REQUESTS": "30",
        "TRANSCEIVER_RATE_LIMIT_SESSIONS": "5",
        "TRANSCEIVER_RATE_LIMIT_TOKENS": "40000",
        "TRANSCEIVER_RATE_LIMIT_WINDOW_S": "10",
        "TRANSCEIVER_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
    }
    limits = TransceiverConfig.load([], env).rate_limits
    assert limits.requests == RateLimit("requests", 30, 10.0)
    assert limits.sessions.limit == 5 and limits.tokens.limit == 40000
    assert [str(n) for n in limits.trusted_proxies] == ["10.0.0.0/8", "127.0.0.1/32"]
    flags = TransceiverConfig.load(["--rate-limit-requests", "7"], env).rate_limits
    assert flags.requests.limit == 7


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("RATE_LIMIT_REQUESTS", "-1", "TRANSCEIVER_RATE_LIMIT_REQUESTS"),
        ("RATE_LIMIT_TOKENS", "many", "TRANSCEIVER_RATE_LIMIT_TOKENS"),
        ("RATE_LIMIT_WINDOW_S", "0", "TRANSCEIVER_RATE_LIMIT_WINDOW_S"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,example.com", "'example.com' is not a CIDR"),
    ],
)
def test_a_bad_limit_setting_is_named(name: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        TransceiverConfig.load([], {**BASE, "TRANSCEIVER_" + name: value})
