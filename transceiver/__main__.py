"""``python -m transceiver``: load and check the configuration, then run the server
(``transceiver.server``: bind the link and HTTP, serve, drain on SIGTERM).

``python -m transceiver export [--since S] [--until S] [--output FILE]`` writes the stored
call records (``transceiver.store.call_log``) as JSON Lines, oldest first, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
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
from transceiver.server import run
from transceiver.store.call_log import CallRecordStore
from transceiver.store.call_records import CallRecordPolicy
from transceiver.store.connection import open_redis
from transceiver.store.errors import StoreError


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
    return run(config, auth, redis, args)


if __name__ == "__main__":
    sys.exit(main())
