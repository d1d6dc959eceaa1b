"""Static checks of compose.yaml and ops/ (no Docker engine needed). The cluster
profile's nodes and init script also run for real, in tests/test_cluster.py; the
metrics the monitoring profile's dashboard queries are scraped for real in
tests/test_metrics.py."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types (no types-PyYAML here)

from sumbatch.config import Settings
from sumbatch.web import metrics
from sumbatch.web.api import create_app
from sumbatch.web.http import Limits
from tests.support import ROOT, run_sumbatch

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
REDIS_CONF_MOUNT = "/usr/local/etc/redis/redis.conf"

# service name -> the sumbatch subcommand it must run
APP_SERVICES = {"api": "api", "projector": "projector", "worker": "worker"}
# the same, in the `cluster` profile, on a 3-master cluster of these nodes
CLUSTER_APP_SERVICES = {f"cluster-{name}": command for name, command in APP_SERVICES.items()}
CLUSTER_NODES = ["cluster-redis-0", "cluster-redis-1", "cluster-redis-2"]
EVERY_APP_SERVICE = {**APP_SERVICES, **CLUSTER_APP_SERVICES}


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
    result = run_sumbatch("--help", env=None)
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
    missing = {"redis", *EVERY_APP_SERVICE, *CLUSTER_NODES, "cluster-init"} - set(services)
    assert not missing, f"compose.yaml lacks services: {sorted(missing)}"


@pytest.mark.parametrize("name", ["worker", "cluster-worker"])
def test_worker_is_scalable(name: str) -> None:
    worker = _service(name)
    assert "container_name" not in worker, "container_name blocks --scale worker=N"
    assert not worker.get("ports"), "published ports would clash under --scale worker=N"


@pytest.mark.parametrize("name", sorted(EVERY_APP_SERVICE))
def test_app_service_builds_from_ops_dockerfile(name: str) -> None:
    build = _service(name).get("build")
    assert isinstance(build, dict), f"{name} has no build mapping"
    assert build.get("context") == ".", f"{name} build context is {build.get('context')!r}"
    assert build.get("dockerfile") == "ops/Dockerfile", f"{name} dockerfile is wrong"
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.parametrize(("name", "subcommand"), sorted(EVERY_APP_SERVICE.items()))
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


def test_the_cluster_profile_is_a_stack_of_its_own() -> None:
    """Nothing of it starts with a plain `docker compose up`, and nothing of it uses
    the single-server Redis: its app services name a node of its cluster and start
    once cluster-init has formed it, and its api is published on a port of its own."""
    for name in [*CLUSTER_APP_SERVICES, *CLUSTER_NODES, "cluster-init"]:
        assert _service(name).get("profiles") == ["cluster"], name
    for name in [*APP_SERVICES, "redis"]:
        assert "profiles" not in _service(name), f"{name} would not start by default"
    init = _command(_service("cluster-init"))
    assert init[:2] == ["sh", "/cluster-init.sh"] and init[2:] == [
        f"{node}:6379" for node in CLUSTER_NODES
    ], init
    assert "./ops/cluster-init.sh:/cluster-init.sh:ro" in _service("cluster-init")["volumes"]
    assert (ROOT / "ops" / "cluster-init.sh").is_file()
    for name in CLUSTER_APP_SERVICES:
        service = _service(name)
        url = urlsplit(_environment(service)["REDIS_URL"] or "")
        assert (url.hostname, url.port) == ("cluster-redis-0", 6379), f"{name}: {url}"
        assert service["depends_on"] == {
            "cluster-init": {"condition": "service_completed_successfully"}
        }, name
    for node in CLUSTER_NODES:
        command = _command(_service(node))
        assert command[command.index("--cluster-announce-hostname") + 1] == node
        assert f"{node}:/data" in _service(node)["volumes"], f"{node} keeps no AOF"
    published = {_interpolate(_service(name)["ports"][0], {}) for name in ("api", "cluster-api")}
    assert published == {"0.0.0.0:5000:5000", "0.0.0.0:5001:5000"}


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


# -- settings reach the app services -------------------------------------------------

# Settings compose owns instead of passing them on, and where it uses each instead.
COMPOSE_OWNS = {
    "SUMBATCH_HOST": ("api", "ports"),
    "SUMBATCH_PORT": ("api", "ports"),
    "SUMBATCH_WORKERS": ("worker", "deploy"),
    "SUMBATCH_FSYNC": ("redis", "command"),
}
# The embedded server's, which compose does not run (the redis service is its own).
EMBEDDED_ONLY = {"SUMBATCH_DATA_DIR", "SUMBATCH_EMBEDDED_PORT"}
# Fixed to the redis service (test_app_service_redis_url_points_at_redis_service).
FIXED = {"REDIS_URL"}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


class _Recording(Mapping[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        self.read.add(str(name))
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@cache
def _variables_read() -> frozenset[str]:
    """Every variable the processes' settings are read from, found by reading them."""
    env = _Recording()
    Settings.from_env(env)
    return frozenset(env.read)


def _passed_on() -> set[str]:
    return set(_variables_read()) - set(COMPOSE_OWNS) - EMBEDDED_ONLY - FIXED


def _interpolate(value: str, host: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR-default}`."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2) or ""
        given = host.get(name)
        if given is None or (given == "" and ":-" in match.group(0)):
            return default
        return given

    return INTERPOLATION.sub(one, value)


def test_the_recording_environment_sees_what_settings_read() -> None:
    read = _variables_read()
    assert {
        "REDIS_URL",
        "SUMBATCH_DURABLE",
        "SUMBATCH_API_TOKEN",
        "SUMBATCH_HEADER_TIMEOUT",
    } <= read
    assert all(name == "REDIS_URL" or name.startswith("SUMBATCH_") for name in read), read


@pytest.mark.parametrize("name", sorted(EVERY_APP_SERVICE))
def test_every_setting_reaches_each_app_service(name: str) -> None:
    env = _environment(_service(name))
    missing = sorted(_passed_on() - set(env))
    assert not missing, f"{name} does not pass on {missing}"
    for variable in _passed_on():
        match = INTERPOLATION.fullmatch(env[variable] or "")
        assert match and match.group(1) == variable, (
            f"{name}: {variable}={env[variable]!r} does not come from ${{{variable}}}"
        )


def test_app_services_share_one_environment() -> None:
    """One environment in each stack, and the two differ only in their Redis."""
    for stack in (APP_SERVICES, CLUSTER_APP_SERVICES):
        environments = {name: _environment(_service(name)) for name in stack}
        assert len({tuple(sorted(env.items())) for env in environments.values()}) == 1, stack
    single, cluster = (_environment(_service(name)) for name in ("api", "cluster-api"))
    assert {k for k in single.keys() | cluster.keys() if single.get(k) != cluster.get(k)} == {
        "REDIS_URL"
    }


@pytest.mark.parametrize("variable", sorted(COMPOSE_OWNS))
def test_settings_compose_owns_are_used_where_it_says(variable: str) -> None:
    service, key = COMPOSE_OWNS[variable]
    assert "${" + variable in yaml.safe_dump(_service(service).get(key)), (
        f"{variable} is not used in {service}.{key}"
    )
    for name in EVERY_APP_SERVICE:
        assert variable not in _environment(_service(name)), f"{name} gets {variable} too"


def test_empty_means_the_default_for_every_setting_passed_on() -> None:
    """`${VAR:-}` hands an unset variable to the container as an empty string: each
    must then read as its default, not as an error or an empty value."""
    for variable in sorted(_passed_on()):
        assert Settings.from_env({variable: ""}) == Settings.from_env({}), variable


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_host_settings_arrive_in_the_app_services(name: str) -> None:
    """The environment each app container gets, interpolated as compose would, read
    by the same code the process runs."""
    declared = _environment(_service(name))

    def container(host: Mapping[str, str]) -> dict[str, str]:
        return {k: _interpolate(v or "", host) for k, v in declared.items()}

    defaults = Settings.from_env(container({}))
    assert defaults == Settings(redis_url="redis://redis:6379/0")
    assert Limits.of(defaults) == Limits()
    host = {
        "SUMBATCH_DURABLE": "true",
        "SUMBATCH_API_TOKEN": "s3cret",
        "SUMBATCH_MAX_TASKS": "7",
        "SUMBATCH_LOG_LEVEL": "DEBUG",
        "SUMBATCH_NAMESPACE": "other",
        "SUMBATCH_HEADER_TIMEOUT": "3",
        "REDIS_URL": "redis://elsewhere:1/0",
    }
    settings = Settings.from_env(container(host))
    assert (settings.durable, settings.api_token, settings.max_tasks_per_group) == (
        True,
        "s3cret",
        7,
    )
    assert (settings.log_level, settings.namespace) == ("DEBUG", "other")
    assert Limits.of(settings).header_timeout == 3.0
    # The compose network's Redis, whatever the host's shell points its own tools at.
    assert settings.redis_url == "redis://redis:6379/0"


def test_published_address_and_worker_replicas_follow_the_settings() -> None:
    (published,) = _service("api")["ports"]
    assert _interpolate(published, {}) == "0.0.0.0:5000:5000"
    host = {"SUMBATCH_HOST": "127.0.0.1", "SUMBATCH_PORT": "8080"}
    assert _interpolate(published, host) == "127.0.0.1:8080:5000"
    replicas = str(_service("worker")["deploy"]["replicas"])
    assert int(_interpolate(replicas, {})) == Settings().workers
    assert _interpolate(replicas, {"SUMBATCH_WORKERS": "5"}) == "5"
    redis_command = " ".join(_command(_service("redis")))
    assert _interpolate(redis_command, {}).endswith(f"--appendfsync {Settings().fsync}")
    assert _interpolate(redis_command, {"SUMBATCH_FSYNC": "always"}).endswith(
        "--appendfsync always"
    )


def test_workers_stop_grace_outlasts_their_shutdown_grace() -> None:
    grace = _service("worker")["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", str(grace))
    assert match, f"stop_grace_period {grace!r}: expected seconds, as `45s`"
    assert int(match.group(1)) > Settings().shutdown_grace


# -- profile `monitoring`: Prometheus and Grafana on the api's /metrics --------------

MONITORING = ["prometheus", "grafana"]
GRAFANA = ROOT / "ops" / "grafana"


def _mounts(name: str) -> dict[str, str]:
    """A service's bind mounts and volumes: source -> path in the container."""
    mounts = {}
    for volume in _service(name).get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        mounts[source] = target
    return mounts


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def test_the_monitoring_profile_runs_beside_the_stack_on_localhost() -> None:
    """Nothing of it starts with a plain `docker compose up`; with the profile, it
    runs beside the app services, which keep no profile. Prometheus has no login, so
    both are published on 127.0.0.1 unless SUMBATCH_MONITORING_HOST says otherwise."""
    for name in MONITORING:
        assert _service(name).get("profiles") == ["monitoring"], name
    for name in [*APP_SERVICES, "redis"]:
        assert "profiles" not in _service(name), name
    published = {name: _interpolate(_service(name)["ports"][0], {}) for name in MONITORING}
    assert published == {"prometheus": "127.0.0.1:9090:9090", "grafana": "127.0.0.1:3000:3000"}
    host = {"SUMBATCH_MONITORING_HOST": "0.0.0.0", "SUMBATCH_GRAFANA_PORT": "3300"}
    assert _interpolate(_service("grafana")["ports"][0], host) == "0.0.0.0:3300:3000"
    volumes = _compose()["volumes"]
    assert {"prometheus-data", "grafana-data"} <= set(volumes), "metrics would not persist"


def test_prometheus_scrapes_the_apis_metrics() -> None:
    prometheus = _service("prometheus")
    config_path = next(
        arg.split("=", 1)[1] for arg in _command(prometheus) if arg.startswith("--config.file=")
    )
    assert _mounts("prometheus")["./ops/prometheus.yml"] == config_path
    config = _yaml(ROOT / "ops" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["api:5000"]
    # The api service, on the port its command listens on inside its container...
    api = _command(_service("api"))
    assert api[api.index("--port") + 1] == "5000"
    # ...serves /metrics (and /system) through the app's routes.
    paths = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    assert {"/metrics", "/system"} <= paths


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    mounts = _mounts("grafana")
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090), datasource["url"]
    assert _service("prometheus")["ports"][0].endswith(":9090")
    (provider,) = _yaml(GRAFANA / "provisioning" / "dashboards" / "sumbatch.yml")["providers"]
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    home = _service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/sumbatch.json"
    assert (GRAFANA / "dashboards" / "sumbatch.json").is_file()
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
        for panel in panels:
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]


def _dashboard_metrics() -> set[str]:
    """The metric families the dashboard's queries name."""
    text = (GRAFANA / "dashboards" / "sumbatch.json").read_text(encoding="utf-8")
    exprs = [t["expr"] for p in json.loads(text)["panels"] for t in p.get("targets", [])]
    names = set(re.findall(r"\bsumbatch_\w+", " ".join(exprs)))
    return {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in names}


def test_the_dashboard_shows_every_metric_and_only_those_metrics_serves() -> None:
    assert _dashboard_metrics() == set(metrics.NAMES)
