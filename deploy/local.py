"""The local development stack behind `make run`: Redis, the relay and transceiver(s) on loopback.

Starts every process itself (each in its own process group, so a terminal's Ctrl-C reaches only
this launcher), waits for each one's ready line with a deadline, prints the URL of the web
client and, on Ctrl-C or SIGTERM, stops exactly the processes it started, by PID, in reverse
order.

- One transceiver (the default): it serves the web client and signalling on ``--http-port``.
- ``--transceivers N`` (N > 1, or ``STACK_TRANSCEIVERS``): a front door
  (``deploy.front_door``, what the Kubernetes Service is in production) listens on
  ``--http-port`` and balances over the transceivers on the ports after it, skipping dead and
  unavailable ones. A transceiver that dies then does not stop the stack while another one
  runs: its sessions can be resumed on the others through the front door.

- ``--workers W`` (or ``STACK_WORKERS``, default 1): each transceiver is a pod of W worker
  processes (``transceiver.workers``); transceiver i's worker w binds the link port
  ``--link-port + i * W + w``, and the relay is given every worker's.

- Redis: when ``redis-server`` is on PATH it is started on a free loopback port with no
  persistence, and ``REDIS_URL`` is passed to the transceivers (``--no-redis`` skips it).
- Auth: off by default (local development, ``--insecure-dev``: the transceiver prints a loud
  warning). ``--auth required`` needs ``TRANSCEIVER_API_KEY`` in the environment.
- Keys: every run makes fresh random ones, the ufrag keyring shared by the relay and the
  transceivers and the transceivers' own ``TRANSCEIVER_SECRET_KEYS`` for ``ek_`` secrets.
- Order: the transceivers first, so the relay's first keyed HELLO finds their link sockets
  bound (they take no media from the relay before it), then the relay, then the front door.
- Agent: the voice pipeline when the transceiver offers it, else the echo agent.
- ``--llm rule|local|openai`` (or ``PIPELINE_LLM``; ``make run LLM=local``): the pipeline's
  language model, passed to the transceivers as ``PIPELINE_LLM``. ``local`` loads the local
  model in each transceiver worker (about 1.2 GB of memory each, and its first start assembles
  the model file), so their ready lines are awaited longer.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from deploy import front_door
from deploy.processes import free_port, text
from transceiver.config import AGENTS

READY_TIMEOUT_S = 60.0
LOCAL_LLM_READY_TIMEOUT_S = 300.0  # assembling (once), checking, loading and warming the model
LLM_CHOICES = ("rule", "local", "openai")
STOP_TIMEOUT_S = 10.0
SUPERVISE_INTERVAL_S = 0.5
URL_LINE = "voicerelay is up: open "
TRANSCEIVERS_LINE = "transceivers: "
LAST_LINE = "Ctrl-C stops every process this started."
FRONT_DOOR = "front-door"


@dataclass(frozen=True)
class StackConfig:
    host: str
    public_port: int
    http_port: int
    link_port: int
    relay_http_port: int
    transceivers: int
    relay_workers: int
    agent: str
    auth: str
    redis: bool
    drain_timeout_s: float
    workers: int = 1
    llm: str = ""  # "": the pipeline's default (rule offline, openai with OPENAI_* set)

    def link_addresses(self) -> list[str]:
        """Each transceiver's ``--link`` (its first worker's; worker w binds the port + w)."""
        step = self.workers
        return [f"{self.host}:{self.link_port + i * step}" for i in range(self.transceivers)]

    def worker_link_addresses(self) -> list[str]:
        """Every worker's link socket, for the relay."""
        count = self.transceivers * self.workers
        return [f"{self.host}:{self.link_port + n}" for n in range(count)]

    @property
    def front_door(self) -> bool:
        return self.transceivers > 1

    def transceiver_http_addresses(self) -> list[str]:
        """The transceivers' HTTP listeners: ``--http-port`` itself when there is one, else
        the ports after the front door's."""
        first = self.http_port + (1 if self.front_door else 0)
        return [f"{self.host}:{first + i}" for i in range(self.transceivers)]

    def url(self, address: str | None = None) -> str:
        return f"http://{address or f'{self.host}:{self.http_port}'}/"


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    ready_text: str
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = READY_TIMEOUT_S


def default_agent() -> str:
    return os.environ.get("TRANSCEIVER_AGENT") or ("pipeline" if "pipeline" in AGENTS else "echo")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("STACK_HOST", "127.0.0.1"))
    parser.add_argument("--public-port", type=int, default=3478)
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--link-port", type=int, default=7000)
    parser.add_argument("--relay-http-port", type=int, default=9100)
    transceivers = os.environ.get("STACK_TRANSCEIVERS", "1")  # argparse applies type= to it
    parser.add_argument("--transceivers", type=int, default=transceivers)
    parser.add_argument("--relay-workers", type=int, default=2)
    workers = os.environ.get("STACK_WORKERS", "1")  # transceiver worker processes
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--agent", default=default_agent(), choices=AGENTS)
    auth = os.environ.get("TRANSCEIVER_AUTH", "off")
    parser.add_argument("--auth", default=auth, choices=("off", "required"))
    parser.add_argument("--no-redis", dest="redis", action="store_false")
    parser.add_argument("--drain-timeout-s", type=float, default=2.0)
    llm = os.environ.get("PIPELINE_LLM", "")
    parser.add_argument("--llm", default=llm, choices=("", *LLM_CHOICES), help="PIPELINE_LLM")
    return parser


def parse_args(argv: Sequence[str]) -> StackConfig:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.transceivers <= 8:
        parser.error("--transceivers must be between 1 and 8")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be between 1 and 16")
    if args.auth == "required" and not os.environ.get("TRANSCEIVER_API_KEY"):
        parser.error("--auth required needs TRANSCEIVER_API_KEY in the environment")
    return StackConfig(**vars(args))


def redis_command(host: str, data_dir: str) -> tuple[Command, str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port(socket.SOCK_STREAM, host)
    argv = [binary, "--port", str(port), "--bind", host, "--dir", data_dir]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    url = f"redis://{text((host, port))}/0"  # an IPv6 host in brackets
    return Command("redis", argv, "Ready to accept connections"), url


LOOPBACK_NETWORKS = "127.0.0.0/8,::1/128"


# The rule-based agent's fixed replies are synthesized as a transceiver starts
# (pipeline.speech_prewarm); pauses count from the voice's end, not webrtcvad's hangover after
# it, and the end-of-turn model hears the silence that hangover gave it (pipeline.vad): turns
# end ~110 ms sooner in Chromium (README, the rule brain's numbers). Off:
# PIPELINE_VAD_VOICE_END_DB=inf PIPELINE_VAD_MODEL_PAD_MS=0. The image sets the same.
OFFLINE_DEFAULTS = {
    "PIPELINE_SPEECH_PREWARM": "1",
    "PIPELINE_VAD_VOICE_END_DB": "40",
    "PIPELINE_VAD_MODEL_PAD_MS": "120",
}


def random_keyring() -> str:
    return f"1:{secrets.token_hex(32)}"


def commands(config: StackConfig, keys: str, redis_url: str | None) -> list[Command]:
    py = sys.executable
    public = f"{config.host}:{config.public_port}"
    env = {"TRANSCEIVER_SECRET_KEYS": random_keyring()}  # never given to the relay
    env |= {"REDIS_URL": redis_url} if redis_url else {}
    env |= {"PIPELINE_LLM": config.llm} if config.llm else {}
    # The offline stack's defaults, unless the caller's environment says otherwise.
    env |= {name: os.environ.get(name, value) for name, value in OFFLINE_DEFAULTS.items()}
    # Behind the front door every request comes from it: its X-Forwarded-For names the client
    # (the per-address rate limit), trusted only from the loopback addresses it connects from.
    env |= {"TRANSCEIVER_TRUSTED_PROXIES": LOOPBACK_NETWORKS} if config.front_door else {}
    ready_s = LOCAL_LLM_READY_TIMEOUT_S if config.llm == "local" else READY_TIMEOUT_S
    http = config.transceiver_http_addresses()
    procs: list[Command] = []
    for i, link in enumerate(config.link_addresses()):
        cmd = [py, "-m", "transceiver", "--link", link, "--public", public, "--keys", keys]
        cmd += ["--http", http[i], "--agent", config.agent]
        cmd += ["--drain-timeout-s", str(config.drain_timeout_s), "--auth", config.auth]
        cmd += ["--workers", str(config.workers)]
        procs.append(Command(f"transceiver-{i}", cmd, "transceiver ready", env, ready_s))
    relay = [py, "-m", "relay", "--public", public, "--workers", str(config.relay_workers)]
    relay += ["--transceivers", ",".join(config.worker_link_addresses()), "--keys", keys]
    relay += ["--http", f"{config.host}:{config.relay_http_port}"]
    procs.append(Command("relay", relay, "relay ready"))
    if config.front_door:
        door = [py, "-m", "deploy.front_door", "--host", config.host]
        door += ["--port", str(config.http_port), "--backends", ",".join(http)]
        door += ["--drain-timeout-s", str(config.drain_timeout_s)]
        procs.append(Command(FRONT_DOOR, door, front_door.READY_LINE))
    return procs


@dataclass
class Child:
    """A process we started; a thread echoes its stdout and notices its ready line."""

    name: str
    proc: subprocess.Popen[str]
    ready: threading.Event = field(default_factory=threading.Event)


def start(command: Command) -> Child:
    proc = subprocess.Popen(
        command.argv,
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        bufsize=1,
        env={**os.environ, **command.env},
        process_group=0,  # Ctrl-C in the terminal reaches only us; we stop the children
    )
    print(f"[stack] started {command.name} (pid {proc.pid})", flush=True)
    child = Child(command.name, proc)
    threading.Thread(target=_echo, args=(child, command.ready_text), daemon=True).start()
    return child


def _echo(child: Child, ready_text: str) -> None:
    """Echo every line (draining the pipe so a chatty child never blocks on it)."""
    assert child.proc.stdout is not None
    for line in child.proc.stdout:
        print(f"[{child.name}] {line.rstrip()}", flush=True)
        if ready_text in line:
            child.ready.set()


def wait_ready(child: Child, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait for the child's ready line, within ``timeout_s``; fail early if it exits."""
    deadline = time.monotonic() + timeout_s
    while not child.ready.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
        if child.proc.poll() is not None or time.monotonic() >= deadline:
            code = child.proc.poll()
            raise RuntimeError(f"{child.name} did not become ready (exit code {code})")


def stop_all(children: list[Child]) -> None:
    for child in reversed(children):
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, proc in ((c.name, c.proc) for c in reversed(children)):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[stack] {name} (pid {proc.pid}) ignored SIGTERM; killing", flush=True)
            proc.kill()
            proc.wait()
        print(f"[stack] stopped {name} (pid {proc.pid}, exit {proc.returncode})", flush=True)


def announce(config: StackConfig, redis_url: str | None) -> None:
    url = config.url()
    print(f"\n  {URL_LINE}{url}", flush=True)
    backends = " ".join(config.url(address) for address in config.transceiver_http_addresses())
    via = " (behind the front door: round-robin, skips dead ones)" if config.front_door else ""
    print(f"  {TRANSCEIVERS_LINE}{backends}{via}")
    llm = config.llm or "default"
    print(
        f"  agent: {config.agent}   llm: {llm}   auth: {config.auth}   redis: {redis_url or 'none'}"
    )
    if config.auth == "required":
        print(
            f"  mint a key: curl -XPOST -H 'Authorization: Bearer $TRANSCEIVER_API_KEY' "
            f"{url}v1/realtime/client_secrets"
        )
    print(f"  {LAST_LINE}\n", flush=True)


def supervise(started: list[Child]) -> None:
    """Return once a child the stack cannot run without has exited: Redis, the relay, the front
    door, or the last transceiver. (Supervising, not synchronising: it polls.)"""
    reported: set[str] = set()
    while True:
        exited = [child for child in started if child.proc.poll() is not None]
        for child in (c for c in exited if c.name not in reported):
            reported.add(child.name)
            code = child.proc.returncode
            print(f"[stack] {child.name} (pid {child.proc.pid}) exited with {code}", flush=True)
        if _fatal(exited, started):
            return
        time.sleep(SUPERVISE_INTERVAL_S)


def _fatal(exited: list[Child], started: list[Child]) -> bool:
    def transceiver(child: Child) -> bool:
        return child.name.startswith("transceiver-")

    if any(not transceiver(child) for child in exited):
        return True
    return sum(map(transceiver, exited)) == sum(map(transceiver, started))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(config: StackConfig, data_dir: str) -> int:
    started: list[Child] = []
    redis = redis_command(config.host, data_dir) if config.redis else None
    redis_url = redis[1] if redis else None
    keys = random_keyring()
    try:
        for command in ([redis[0]] if redis else []) + commands(config, keys, redis_url):
            started.append(start(command))
            wait_ready(started[-1], command.ready_timeout_s)
        announce(config, redis_url)
        supervise(started)
        print("[stack] a process the stack needs exited; stopping the rest", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\n[stack] stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"[stack] {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(started)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with tempfile.TemporaryDirectory(prefix="voicerelay-stack-") as data_dir:
        return run(config, data_dir)


if __name__ == "__main__":
    sys.exit(main())
