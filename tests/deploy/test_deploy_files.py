"""No container engine runs here: the Dockerfile, docker-compose.yml and deploy/nginx.conf are
parsed, and every command, option, port, path, setting and health route they name is checked
against the code: a renamed command, setting or route, or a port changed in one place only,
fails here rather than at an operator's first ``docker compose up``."""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from sqlalchemy.engine import make_url

from api.app import create_app
from api.cli import app as cli_app
from auth.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ENV_PREFIX = "MODELGATE_"
SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


# --- the Dockerfile -------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages and their instructions (continuation lines joined, comments
    dropped, build arguments of FROM substituted with their defaults)."""
    text = (REPO / "Dockerfile").read_text()
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            arguments[name] = default
        elif keyword == "FROM":
            base, _, name = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m[1]], rest).partition(
                " AS "
            )
            stages.append(Stage(base.strip(), name.strip() or None, []))
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) CMD, HEALTHCHECK CMD or compose command."""
    assert arguments.startswith("["), f"not in exec form: {arguments}"
    parsed = yaml.safe_load(arguments)  # JSON is YAML
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def env_values(stage: Stage) -> dict[str, str]:
    """The ENV of a stage (``A=1 B=2`` forms)."""
    values: dict[str, str] = {}
    for arguments in stage.all("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            values[name] = value
    return values


# --- what the files must agree with ---------------------------------------------------------


def cli_command(argv: list[str]) -> str:
    """The ``modelgate`` command that ``argv`` (starting with ``modelgate``) runs, as its words
    (``"db upgrade"``); its options and values are parsed as the command line would parse them:
    an unknown command or option, or a value of the wrong type, fails."""
    assert argv[0] == "modelgate", argv
    # typer carries its own copy of click: its classes, not click's, and duck typing.
    command: Any = typer.main.get_command(cli_app)
    context = command.context_class(command, info_name="modelgate")
    words: list[str] = []
    args = argv[1:]
    while hasattr(command, "list_commands"):
        assert args, f"{argv}: a command group, not a command"
        sub = command.get_command(context, args[0])
        assert sub is not None, f"{argv}: no command {args[0]!r}"
        words.append(args[0])
        command, args = sub, args[1:]
        context = command.context_class(command, info_name=words[-1], parent=context)
    command.make_context(words[-1], list(args), parent=context.parent)
    return " ".join(words)


def option_value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


@pytest.fixture(scope="module")
def openapi_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The application's routes, as its OpenAPI document lists them."""
    directory = tmp_path_factory.mktemp("deploy-files")
    settings = Settings(_env_file=None, model_dir=directory, var_dir=directory)  # type: ignore[call-arg]
    paths: dict[str, Any] = create_app(settings).openapi()["paths"]
    return paths


def assert_get_route(openapi_paths: dict[str, Any], url: str, port: str | None = None) -> None:
    parts = urlsplit(url)
    assert "get" in openapi_paths.get(parts.path, {}), f"{url}: no GET route {parts.path}"
    if port is not None:
        assert str(parts.port or 80) == port, f"{url}: not port {port}"


def assert_real_settings(names: Iterator[str] | list[str], where: str) -> None:
    for name in names:
        if name.startswith(ENV_PREFIX):
            assert name in SETTINGS, f"{where}: {name} is not a setting (auth.settings)"


# --- the Dockerfile -------------------------------------------------------------------------


def test_the_image_is_built_in_stages_on_a_slim_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert "slim" in final.base, final.base
    assert all(stage.base == final.base for stage in stages), "one base for every stage"
    # The final stage installs nothing: no package manager, no pip, no compiler.
    for command in final.all("RUN"):
        assert not re.search(r"apt-get|apk |pip |gcc|build-essential|make ", command), command
    # It takes only the virtual environment and the application from the build stage.
    sources = [arguments.split() for arguments in final.all("COPY")]
    assert sources, "the final stage copies from the build stage"
    for copy in sources:
        assert copy[0] == f"--from={stages[0].name}", copy
        assert copy[1:] in (["/opt/venv", "/opt/venv"], ["/app", "/app"]), copy


def test_every_file_the_image_copies_exists_and_no_secret_goes_in() -> None:
    stages = dockerfile_stages()
    for copy in stages[0].all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert source not in (".", ".env"), "the build context (and its .env) stays out"
    for stage in stages:
        for keyword in ("ENV", "ARG"):
            for arguments in stage.all(keyword):
                assert not re.search(r"PEPPER|SECRET|PASSWORD|TOKEN", arguments), arguments
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".env" in ignored


def test_the_image_runs_the_real_serve_command_as_a_user_that_cannot_write_the_registry() -> None:
    final = dockerfile_stages()[-1]
    users = final.all("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1] not in ("root", "0"), users
    keywords = [i.keyword for i in final.instructions]
    assert keywords.index("USER") < keywords.index("CMD")
    environment = env_values(final)
    assert_real_settings(list(environment), "Dockerfile ENV")
    assert environment["MODELGATE_ENV"] == "production"
    registry = environment["MODELGATE_MODEL_DIR"]
    # Root's (COPY), made read-only, and never handed to the runtime user.
    runs = " && ".join(final.all("RUN"))
    assert f"chmod -R a-w {registry}" in runs, runs
    for part in runs.split("&&"):
        if "chown" in part:
            assert registry not in part.split()[1:], part
    [cmd] = final.all("CMD")
    argv = exec_form(cmd)
    assert cli_command(argv) == "serve"
    [exposed] = final.all("EXPOSE")
    assert option_value(argv, "--port") == exposed
    assert option_value(argv, "--host") == "0.0.0.0"  # noqa: S104 (in a container, on purpose)
    # The build stage's own commands exist too.
    for run in dockerfile_stages()[0].all("RUN"):
        for invocation in re.findall(r"(?:^|[\s;&])(modelgate(?: [a-z-]+)+)", run):
            cli_command(invocation.split())


def test_the_image_healthcheck_asks_the_liveness_route_on_the_served_port(
    openapi_paths: dict[str, Any],
) -> None:
    final = dockerfile_stages()[-1]
    [healthcheck] = final.all("HEALTHCHECK")
    command = healthcheck[healthcheck.index("CMD ") + 4 :]
    [url] = re.findall(r"https?://[^'\" ]+", " ".join(exec_form(command)))
    assert urlsplit(url).path == "/api/v1/health/live"
    assert_get_route(openapi_paths, url, port=final.all("EXPOSE")[0])


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping"
    return {name: str(value) for name, value in environment.items()}


def volumes_of(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def test_every_setting_compose_sets_is_real_and_the_secrets_come_from_the_environment(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        environment = environment_of(service)
        assert_real_settings(list(environment), f"docker-compose.yml service {name}")
        for variable in ("MODELGATE_KEY_PEPPER", "MODELGATE_JWT_SECRET"):
            if variable in environment:
                assert environment[variable] == f"${{{variable}:?set {variable}}}"
        # Values parse as the settings would take them.
        values = {
            key.removeprefix(ENV_PREFIX).lower(): value
            for key, value in environment.items()
            if "${" not in value
        }
        Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_every_command_compose_runs_exists(compose: dict[str, Any]) -> None:
    commands = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        if command and command[0] == "modelgate":
            commands[name] = cli_command(command)
    assert commands == {"migrate": "db upgrade", "api": "serve", "registry": "models train"}


def test_compose_wires_the_replicas_behind_nginx(
    compose: dict[str, Any], openapi_paths: dict[str, Any]
) -> None:
    services = compose["services"]
    api, nginx, migrate = services["api"], services["nginx"], services["migrate"]
    final = dockerfile_stages()[-1]
    # Two replicas of the image, serving on the port the image exposes and nginx proxies to.
    assert api["deploy"]["replicas"] == 2
    assert api["build"] == "."
    port = option_value(api["command"], "--port")
    assert port == final.all("EXPOSE")[0]
    assert api["expose"] == [port]
    assert "ports" not in api, "the replicas are reached through nginx only"
    site = (REPO / "deploy" / "nginx.conf").read_text()
    assert re.search(rf"^\s*server api:{port}\b", site, re.M), "nginx's upstream is the api"
    # Order of start: the schema once, after Postgres; the replicas after it; nginx last.
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no"
    assert api["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert nginx["depends_on"] == {"api": {"condition": "service_healthy"}}
    # A replica stopped is given the time its drain and its close may take before SIGKILL.
    shutdown = Settings(
        _env_file=None,
        **{  # type: ignore[arg-type]
            key.removeprefix(ENV_PREFIX).lower(): value
            for key, value in environment_of(api).items()
            if key == "MODELGATE_SHUTDOWN_TIMEOUT_SECONDS"
        },
    ).shutdown_timeout_seconds
    grace = re.fullmatch(r"(\d+)s", api["stop_grace_period"])
    assert grace is not None
    assert int(grace[1]) > 2 * shutdown, (api["stop_grace_period"], shutdown)
    # Every service something waits on for health has a health check (the api's: the image's).
    for name in ("postgres", "redis", "nginx"):
        assert services[name]["healthcheck"]["test"], name
    assert final.all("HEALTHCHECK")
    # nginx's own health check goes through to the liveness route.
    [url] = [part for part in nginx["healthcheck"]["test"] if part.startswith("http")]
    assert_get_route(openapi_paths, url)
    # Its configuration is the repository's.
    assert ("./deploy/nginx.conf", "/etc/nginx/conf.d/default.conf", "ro") in volumes_of(nginx)
    # The database and Redis the settings name are the services of those names.
    environment = environment_of(api)
    database = make_url(environment["MODELGATE_DATABASE_URL"].replace("${", "").replace("}", ""))
    assert database.host in services
    assert database.port == 5432
    assert database.drivername == "postgresql+asyncpg"
    assert urlsplit(environment["MODELGATE_REDIS_URL"]).hostname in services
    assert (
        environment_of(migrate)["MODELGATE_DATABASE_URL"] == environment["MODELGATE_DATABASE_URL"]
    )
    assert "MODELGATE_KEY_PEPPER" not in environment_of(migrate), "migrate needs no secret"


def test_compose_trusts_nginx_alone_as_the_proxy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    trusted = Settings(  # type: ignore[call-arg]
        _env_file=None,
        trusted_proxies=environment_of(services["api"])["MODELGATE_TRUSTED_PROXIES"],
    ).trusted_proxy_networks
    nginx_address = ipaddress.ip_address(services["nginx"]["networks"]["edge"]["ipv4_address"])
    assert trusted == (ipaddress.ip_network(f"{nginx_address}/32"),)
    [pool] = compose["networks"]["edge"]["ipam"]["config"]
    assert nginx_address in ipaddress.ip_network(pool["subnet"])
    # No other container is ever given nginx's address.
    assert nginx_address not in ipaddress.ip_network(pool["ip_range"])
    assert "edge" in services["api"]["networks"]
    # Postgres and Redis are on the internal network only, never the edge.
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("postgres", "redis", "migrate"):
        assert services[name]["networks"] == ["backend"], name
    # nginx overwrites the client's X-Forwarded-For with the address it saw.
    site = (REPO / "deploy" / "nginx.conf").read_text()
    assert re.findall(r"proxy_set_header\s+X-Forwarded-For\s+(\S+);", site) == ["$remote_addr"]
    # And retries only what is safe to retry.
    [retry] = re.findall(r"^\s*proxy_next_upstream\s+([^;]+);", site, re.M)
    assert "non_idempotent" not in retry.split()


def test_compose_keeps_the_data_and_mounts_the_registry_read_only(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    registry = env_values(dockerfile_stages()[-1])["MODELGATE_MODEL_DIR"]
    assert ("models", registry, "ro") in volumes_of(services["api"])
    # Only the operator's one-shot tool writes it, and `up` does not start it.
    writers = [
        name
        for name, service in services.items()
        for source, target, mode in volumes_of(service)
        if target == registry and mode != "ro"
    ]
    assert writers == ["registry"]
    assert services["registry"]["profiles"] == ["tools"]
    assert ("pgdata", "/var/lib/postgresql/data", "rw") in volumes_of(services["postgres"])
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert ("redisdata", "/data", "rw") in volumes_of(services["redis"])
    # Every named volume is declared; every bind mount's source exists.
    for name, service in services.items():
        for source, _, _ in volumes_of(service):
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
