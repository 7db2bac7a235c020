"""The deployment files are valid as their own tools see them, offline; the image is built
from the lock in two stages and runs its entry points.

This machine cannot pull base images, so the image itself is not built here. What is checked in
``make test``: every Dockerfile passes hadolint, and the image's stages (read from
deploy/Dockerfile) install the lock alone, leave build tools behind and run as a user.
``make image-smoke`` (VOICERELAY_IMAGE_SMOKE=1, ~1 minute) runs the build stage's own commands
into a fresh venv and starts each entry point the way the image's ENTRYPOINT and CMD do.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from relay.config import ConfigError as RelayConfigError
from relay.config import load_config as load_relay_config
from transceiver.config import ConfigError as TransceiverConfigError
from transceiver.config import TransceiverConfig
from transceiver.http.auth import AuthConfig, AuthConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_kustomize_builds_and_validates_against_kubernetes_schemas(tmp_path: Path) -> None:
    built = run(str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / "dev"))
    assert built.returncode == 0, built.stderr
    manifest = tmp_path / "voicerelay.yaml"
    manifest.write_text(built.stdout)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds
    checked = run(str(BIN / "kubernetes-validate"), "--strict", str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_pod_has_liveness_readiness_and_metrics_annotations() -> None:
    built = run(str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s" / "base"))
    workloads = [
        d for d in yaml.safe_load_all(built.stdout) if d and "template" in d.get("spec", {})
    ]
    assert len(workloads) == 2
    for workload in workloads:
        pod = workload["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for container in pod["spec"]["containers"]:
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NOT_OURS = {".venv", "build", "node_modules", ".git", ".mypy_cache", ".ruff_cache"}


def dockerfiles() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("Dockerfile*")
        if not NOT_OURS & set(path.relative_to(ROOT).parts) and path.is_file()
    )


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dockerfile_passes_hadolint(path: Path) -> None:
    checked = run(str(BIN / "hadolint"), str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_hadolint_is_the_locked_one_and_finds_a_bad_line(tmp_path: Path) -> None:
    assert "2.15.1" in run(str(BIN / "hadolint"), "--version").stdout
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    checked = run(str(BIN / "hadolint"), str(bad))
    assert checked.returncode != 0 and "DL3007" in checked.stdout  # :latest


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]


def stages(text: str) -> list[Stage]:
    """A Dockerfile's stages: instructions with continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    found: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            base, _, alias = rest.partition(" AS ")
            found.append(Stage(base.strip(), alias.strip() or None))
        else:
            found[-1].instructions.append((instruction.upper(), rest.strip()))
    return found


def commands(rest: str) -> list[list[str]]:
    """A RUN line's commands, split at ``&&``."""
    return [shlex.split(part) for part in rest.split("&&") if part.strip()]


def image_findings(text: str) -> list[str]:
    """What keeps an image from being small, locked and unprivileged."""
    found = []
    built = stages(text)
    if len(built) < 2:
        return ["one stage: build tools and caches ship with the image"]
    build, final = built[0], built[-1]
    if final.base != build.base:
        found.append(f"final stage on {final.base}, built on {build.base}: the venv may not run")
    installs = [
        argv for rest in build.all("RUN") for argv in commands(rest) if "install" in argv[1:2]
    ]
    for argv in installs:
        from_lock = "--require-hashes" in argv and "requirements/runtime.txt" in argv
        if not from_lock and "--no-deps" not in argv:
            found.append(f"installs unlocked dependencies: {shlex.join(argv)}")
        if from_lock and not {"--no-deps", "--only-binary"} <= set(argv):
            found.append(f"may build from source: {shlex.join(argv)}")
    if not any("requirements/runtime.txt" in argv for argv in installs):
        found.append("the build stage does not install requirements/runtime.txt")
    for rest in final.all("RUN"):
        for argv in commands(rest):
            if argv[0] in {"pip", "apt-get", "apt", "gcc", "cc", "make"} or "install" in argv:
                found.append(f"the final stage runs {argv[0]} {' '.join(argv[1:2])}")
    copies = final.all("COPY")
    if not copies or not all(c.startswith(f"--from={build.name} ") for c in copies):
        found.append("the final stage copies more than the build stage's environment")
    users = final.all("USER")
    if not users or not users[-1].isdigit() or users[-1] == "0":
        found.append("runs as root (USER must be a numeric non-root id)")
    return found


def test_the_image_is_built_from_the_lock_in_two_stages_and_runs_as_a_user() -> None:
    assert image_findings(DOCKERFILE.read_text()) == []
    final = stages(DOCKERFILE.read_text())[-1]
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["python", "-m"]


def test_an_image_that_keeps_build_tools_or_root_is_found() -> None:
    text = DOCKERFILE.read_text()
    one_stage = "FROM python:3.11-slim-bookworm\nRUN pip install -r requirements.txt\n"
    assert image_findings(one_stage) == ["one stage: build tools and caches ship with the image"]
    worse = text.replace("USER 10001", "USER root").replace(
        "COPY --from=build /opt/voicerelay /opt/voicerelay",
        "COPY --from=build /opt/voicerelay /opt/voicerelay\n"
        "RUN apt-get update && apt-get install -y gcc\nCOPY relay /src/relay",
    )
    worse = worse.replace("--only-binary :all: ", "")
    assert image_findings(worse) == [
        "may build from source: /opt/voicerelay/bin/pip install --require-hashes --no-deps -r "
        "requirements/runtime.txt",
        "the final stage runs apt-get update",
        "the final stage runs apt-get install",
        "the final stage copies more than the build stage's environment",
        "runs as root (USER must be a numeric non-root id)",
    ]


# --- make image-smoke: the image's commands from a fresh venv ------------------------------------

SMOKE = os.environ.get("VOICERELAY_IMAGE_SMOKE") == "1"
SMOKE_KEYS = "1:" + "5a" * 32


def image_venv(where: Path) -> Path:
    """The build stage's own RUN commands, the image's /opt/voicerelay moved under ``where``,
    in a build context holding what the stage COPYs."""
    build = stages(DOCKERFILE.read_text())[0]
    context = where / "src"
    context.mkdir()
    for rest in build.all("COPY"):
        *sources, _ = shlex.split(rest)
        for source in sources:
            target = context / source
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, target)
    venv = where / "opt-voicerelay"
    for rest in build.all("RUN"):
        for argv in commands(rest.replace("/opt/voicerelay", str(venv))):
            if argv[0] == "python":
                argv[0] = sys.executable  # the base image's interpreter: ours, same version
            subprocess.run(argv, cwd=context, check=True, timeout=600, capture_output=True)
    return venv


def as_the_image_runs(venv: Path, *cmd: str) -> list[str]:
    final = stages(DOCKERFILE.read_text())[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    return [*json.loads(entrypoint), *cmd]


def image_env(venv: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/nonexistent",
        **extra,
    }


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def until_served(url: str, what: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not answer {url}") from None
            time.sleep(0.2)


def free(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(not SMOKE, reason="make image-smoke runs it (a fresh venv takes ~1 min)")
def test_the_image_entry_points_run_from_a_fresh_venv_built_from_the_lock(tmp_path: Path) -> None:
    venv = image_venv(tmp_path)
    outside = tmp_path / "cwd"  # not the repository: only the venv's installed code runs
    outside.mkdir()
    final = stages(DOCKERFILE.read_text())[-1]
    (default,) = final.all("CMD")
    assert json.loads(default) == ["transceiver"]
    link, http_t, http_r = (
        free(socket.SOCK_DGRAM),
        free(socket.SOCK_STREAM),
        free(socket.SOCK_STREAM),
    )
    keys = {"TRANSCEIVER_KEYS": SMOKE_KEYS, "RELAY_KEYS": SMOKE_KEYS}
    transceiver_env = image_env(
        venv,
        **keys,
        TRANSCEIVER_LINK=f"127.0.0.1:{link}",
        TRANSCEIVER_PUBLIC="127.0.0.1:3478",
        TRANSCEIVER_AUTH="off",
    )
    relay_env = image_env(venv, **keys, RELAY_TRANSCEIVERS=f"localhost:{link}")
    public = f"127.0.0.1:{free(socket.SOCK_DGRAM)}"
    started = [
        subprocess.Popen(
            as_the_image_runs(venv, *json.loads(default), "--http", f"127.0.0.1:{http_t}"),
            cwd=outside,
            env=transceiver_env,
        ),
        subprocess.Popen(
            as_the_image_runs(venv, "relay", "--http", f"127.0.0.1:{http_r}", "--public", public),
            cwd=outside,
            env=relay_env,
        ),
    ]
    try:
        served = until_served(f"http://127.0.0.1:{http_t}/metrics", "the transceiver")
        assert "transceiver_capacity 100.0" in served
        until_served(f"http://127.0.0.1:{http_r}/livez", "the relay")
        deadline = time.monotonic() + 30
        while 'relay_transceivers{worker="0"} 1.0' not in get(f"http://127.0.0.1:{http_r}/metrics"):
            assert time.monotonic() < deadline, "the relay did not find the transceiver"
            time.sleep(0.2)
        helped = subprocess.run(
            as_the_image_runs(venv, "pipeline", "--help"),
            cwd=outside,
            env=image_env(venv),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert helped.returncode == 0, helped.stderr
        for module in ("relay", "transceiver", "pipeline"):
            where = subprocess.run(
                [as_the_image_runs(venv)[0], "-c", f"import {module}; print({module}.__file__)"],
                cwd=outside,
                env=image_env(venv),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            assert where.startswith(str(venv)), where  # the venv's copy, not the repository
    finally:
        for process in started:  # only the processes this test started, by their Popen
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def env_file(name: str, overlay: str = "production") -> dict[str, str]:
    lines = (ROOT / "k8s" / "overlays" / overlay / name).read_text().splitlines()
    entries = [line.partition("=") for line in lines if line.strip() and not line.startswith("#")]
    return {key: value for key, _, value in entries}


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_shipped_keys_are_placeholders_that_neither_process_accepts(overlay: str) -> None:
    shared, own = env_file("keys.env", overlay), env_file("transceiver-keys.env", overlay)
    assert shared["RELAY_KEYS"] == shared["TRANSCEIVER_KEYS"]
    with pytest.raises(RelayConfigError, match="^RELAY_KEYS: key 1 secret is not hex"):
        load_relay_config([], {**shared, "RELAY_TRANSCEIVERS": "127.0.0.1:7000"})
    with pytest.raises(TransceiverConfigError, match="^TRANSCEIVER_KEYS: key 1 secret is not"):
        TransceiverConfig.load([], shared)
    with pytest.raises(AuthConfigError, match="^TRANSCEIVER_SECRET_KEYS: key 1 secret is not"):
        AuthConfig.validated("required", "k8s-test-api-key-0123", own["TRANSCEIVER_SECRET_KEYS"])


def test_transceivers_behind_the_front_door_trust_its_forwarded_address_only() -> None:
    """Behind make run's front door every request arrives from it: the transceivers take the
    client's address from its X-Forwarded-For (per-address rate limits), from loopback only."""
    from deploy import local
    from transceiver.config import ConfigError, _networks

    keys = "1:" + "00" * 32
    behind = local.commands(local.parse_args(["--transceivers", "2"]), keys, None)
    door = next(c for c in behind if c.name == local.FRONT_DOOR)
    assert door.argv[door.argv.index("--drain-timeout-s") + 1] == "2.0"
    proxies = [c.env.get("TRANSCEIVER_TRUSTED_PROXIES") for c in behind if "transceiver" in c.name]
    assert proxies == [local.LOOPBACK_NETWORKS] * 2
    assert [str(n) for n in _networks(local.LOOPBACK_NETWORKS)] == ["127.0.0.0/8", "::1/128"]
    alone = local.commands(local.parse_args([]), keys, None)  # one transceiver: no front door
    assert all("TRANSCEIVER_TRUSTED_PROXIES" not in c.env for c in alone)
    with pytest.raises(ConfigError):
        _networks("127.0.0.1/40")


def test_make_runs_redis_is_reached_at_the_url_it_hands_out_on_an_ipv6_host(
    tmp_path: Path,
) -> None:
    """STACK_HOST=::1: the transceivers' Redis URL names the host in brackets (unbracketed,
    ``redis://::1:port/0`` has no port a client can read)."""
    import redis

    from deploy import local

    made = local.redis_command("::1", str(tmp_path))
    if made is None:
        pytest.fail("redis-server is not installed (make sysdeps installs it)")
    command, url = made
    server = subprocess.Popen(command.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)  # (an unreadable URL fails here)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping() is True
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert client.connection_pool.connection_kwargs["host"] == "::1"
    finally:
        if client is not None:
            client.close()
        server.terminate()
        server.wait(timeout=10)


def test_make_runs_stack_and_the_image_set_the_same_offline_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transceivers of make run's stack and the image's environment: the prewarmed replies
    and the pauses counted from the voice's end (VadConfig.voice_end_db, model_pad_ms); the
    caller's environment overrides make run's."""
    from deploy import local
    from pipeline.config import PipelineConfig

    keys = "1:" + "00" * 32
    for name in local.OFFLINE_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    (transceiver,) = [c for c in local.commands(local.parse_args([]), keys, None) if c.env]
    final = stages(DOCKERFILE.read_text())[-1]
    image = dict(item.split("=", 1) for rest in final.all("ENV") for item in shlex.split(rest))
    for env in (transceiver.env, image):
        assert {name: env.get(name) for name in local.OFFLINE_DEFAULTS} == local.OFFLINE_DEFAULTS
        vad = PipelineConfig.from_env(env).engine_config().vad
        assert (vad.voice_end_db, vad.model_pad_ms) == (40.0, 120)
    monkeypatch.setenv("PIPELINE_VAD_VOICE_END_DB", "inf")
    (transceiver,) = [c for c in local.commands(local.parse_args([]), keys, None) if c.env]
    assert transceiver.env["PIPELINE_VAD_VOICE_END_DB"] == "inf"
