"""Static checks of compose.yaml and ops/ (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
REDIS_CONF_MOUNT = "/usr/local/etc/redis/redis.conf"

# service name -> the sumbatch subcommand it must run
APP_SERVICES = {"api": "api", "projector": "projector", "worker": "worker"}


@cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def _service(name: str) -> dict[str, Any]:
    service = _compose()["services"][name]
    assert isinstance(service, dict), f"service {name} is not a mapping"
    return service


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if isinstance(command, str):
        return shlex.split(command)
    if isinstance(command, list):
        return [str(part) for part in command]
    return []


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): None if v is None else str(v) for k, v in env.items()}
    pairs = (str(item).partition("=") for item in env)
    return {key: value if sep else None for key, sep, value in pairs}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


@cache
def _cli_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sumbatch", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"`python -m sumbatch --help` failed:\n{result.stderr}"
    return result.stdout


def _cli_subcommands(help_text: str) -> set[str]:
    """Subcommand names argparse prints: `{a,b,c}` choices and indented listing rows."""
    names: set[str] = set()
    for group in re.findall(r"\{([\w,-]+)\}", help_text):
        names.update(group.split(","))
    names.update(re.findall(r"^\s{2,}([\w-]+)\b", help_text, flags=re.MULTILINE))
    return names


def test_expected_services_exist() -> None:
    services = _compose().get("services") or {}
    missing = {"redis", *APP_SERVICES} - set(services)
    assert not missing, f"compose.yaml lacks services: {sorted(missing)}"


def test_worker_is_scalable() -> None:
    worker = _service("worker")
    assert "container_name" not in worker, "container_name blocks --scale worker=N"
    assert not worker.get("ports"), "published ports would clash under --scale worker=N"


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_builds_from_ops_dockerfile(name: str) -> None:
    build = _service(name).get("build")
    assert isinstance(build, dict), f"{name} has no build mapping"
    assert build.get("context") == ".", f"{name} build context is {build.get('context')!r}"
    assert build.get("dockerfile") == "ops/Dockerfile", f"{name} dockerfile is wrong"
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.parametrize(("name", "subcommand"), sorted(APP_SERVICES.items()))
def test_app_service_runs_real_entry_point(name: str, subcommand: str) -> None:
    command = _command(_service(name))
    assert command[:2] == ["sumbatch", subcommand], f"{name} runs {command!r}"
    assert subcommand in _cli_subcommands(_cli_help()), (
        f"`sumbatch {subcommand}` is not a subcommand listed by `python -m sumbatch --help`"
    )


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_redis_url_points_at_redis_service(name: str) -> None:
    url = _environment(_service(name)).get("REDIS_URL")
    assert url, f"{name} has no REDIS_URL"
    parts = urlsplit(url)
    assert parts.scheme in {"redis", "rediss"}, f"{name} REDIS_URL scheme: {url}"
    assert parts.hostname == "redis", f"{name} REDIS_URL host is not the redis service: {url}"
    assert parts.port in {None, 6379}, f"{name} REDIS_URL port: {url}"


def test_redis_mounts_config_with_aof() -> None:
    redis = _service("redis")
    sources = {
        str(volume).split(":")[0]: str(volume).split(":")[1]
        for volume in redis.get("volumes") or []
        if isinstance(volume, str) and ":" in volume
    }
    assert sources.get("./ops/redis.conf") == REDIS_CONF_MOUNT, f"redis volumes: {sources}"
    assert REDIS_CONF_MOUNT in _command(redis), "redis-server is not started with the config"
    conf = ROOT / "ops" / "redis.conf"
    assert conf.is_file()
    directives = [line.split() for line in conf.read_text(encoding="utf-8").splitlines()]
    assert ["appendonly", "yes"] in directives, "ops/redis.conf does not enable the AOF"


def test_dockerfile_runs_sumbatch_as_non_root() -> None:
    assert DOCKERFILE.is_file()
    instructions = _dockerfile_instructions()
    start = [args for keyword, args in instructions if keyword in {"CMD", "ENTRYPOINT"}]
    assert start, "Dockerfile has neither CMD nor ENTRYPOINT"
    assert "sumbatch" in start[-1], f"Dockerfile starts {start[-1]!r}"
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "image runs as root"
