"""``python -m transceiver``: load and check the configuration, then run the server
(``transceiver.server``: bind the link and HTTP, serve, drain on SIGTERM).

``python -m transceiver export [--since S] [--until S] [--output FILE]`` writes the stored
call records (``transceiver.store.call_log``) as JSON Lines, oldest first, and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from pipeline.config import ConfigError as PipelineConfigError
from pipeline.config import PipelineConfig
from relay.wire.redis_config import RedisConfig, RedisConfigError, redis_flags, with_flags
from transceiver.config import ConfigError, TransceiverConfig
from transceiver.http.auth import AuthConfig, AuthConfigError, auth_flags
from transceiver.store.errors import StoreError
from transceiver.workers.seats import SEAT_ENV, Seat, SeatError, worker_link

# The checks above import only config modules (argparse and dataclasses); the server, the store
# and asyncio are imported once the configuration has passed (the server imports fastapi, aiortc,
# the pipeline and redis: 0.8 s), so a bad setting is answered at once.


def export_main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """``python -m transceiver export``: the call records as JSON Lines."""
    parser = argparse.ArgumentParser(
        prog="python -m transceiver export",
        description="Write the call records in Redis as JSON Lines, oldest first.",
        parents=[redis_flags()],
    )
    parser.add_argument("--since", type=float, help="calls started at or after (unix seconds)")
    parser.add_argument("--until", type=float, help="calls started at or before (unix seconds)")
    parser.add_argument("--output", help="write here instead of standard output")
    args = parser.parse_args(argv)
    try:
        redis = RedisConfig.from_env(with_flags(args, os.environ))
    except RedisConfigError as exc:
        print(f"transceiver export: {exc}", file=sys.stderr)
        return 2
    if redis is None:
        print("transceiver export: set REDIS_URL (or --redis-url)", file=sys.stderr)
        return 2
    import asyncio

    since = None if args.since is None else round(args.since * 1000)
    until = None if args.until is None else round(args.until * 1000)
    with contextlib.ExitStack() as files:
        target = out if args.output is None else files.enter_context(open(args.output, "w"))
        try:
            count = asyncio.run(_export(redis, since, until, target))
        except StoreError as exc:
            print(f"transceiver export: {exc}", file=sys.stderr)
            return 1
    print(f"transceiver export: {count} call records", file=sys.stderr)
    return 0


async def _export(redis: RedisConfig, since: int | None, until: int | None, out: TextIO) -> int:
    from transceiver.store.call_log import CallRecordStore
    from transceiver.store.call_records import CallRecordPolicy
    from transceiver.store.connection import open_redis

    connection = open_redis(redis)
    count = 0
    try:
        store = CallRecordStore(connection.client, redis.key_prefix, CallRecordPolicy())
        async for record in store.export(since, until):
            out.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
            count += 1
    finally:
        await connection.aclose()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["export"]:
        return export_main(args[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a pod's loopback requests
    # the openai SDK's own httpx (3.x): a line per provider request (0.4 % of the CPU sampled)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        auth_args, rest = auth_flags().parse_known_args(args)
        redis_args, rest = redis_flags().parse_known_args(rest)
        config = TransceiverConfig.load(rest, parents=[auth_flags(), redis_flags()])  # --help: all
        auth = AuthConfig.from_flags(auth_args, os.environ)
        auth.check_apart_from(config.keyring)
        if config.agent == "pipeline":
            PipelineConfig.from_env(os.environ)  # validated before anything starts
        redis = RedisConfig.from_env(with_flags(redis_args, os.environ))
    except (ConfigError, AuthConfigError, PipelineConfigError, RedisConfigError) as exc:
        print(f"transceiver: {exc}", file=sys.stderr)
        return 2
    auth.warn_if_open()
    return _run(config, auth, redis, args)


def _run(
    config: TransceiverConfig, auth: AuthConfig, redis: RedisConfig | None, args: list[str]
) -> int:
    """One process, a pod's worker (its seat handed down by the supervisor), or a pod's
    supervisor (``TRANSCEIVER_WORKERS`` > 1), which imports no more than it runs."""
    seat_text = os.environ.get(SEAT_ENV)
    if seat_text is not None:
        try:
            seat = Seat.from_env(seat_text)
        except SeatError as exc:
            print(f"transceiver: {exc}", file=sys.stderr)
            return 2
        from transceiver.server import run_worker

        return run_worker(config, auth, redis, seat)
    from transceiver.workers.supervisor import run_pod, usable_cpus

    count = config.workers or usable_cpus()
    if count == 1:
        from transceiver.server import run_alone

        return run_alone(config, auth, redis)
    last_port = worker_link(config.link, count - 1)[1]
    if last_port > 65535:
        print(f"transceiver: {count} workers need link ports to {last_port}", file=sys.stderr)
        return 2
    return run_pod(config, args, count)


if __name__ == "__main__":
    sys.exit(main())
