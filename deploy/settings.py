"""What the service binaries read, for the deployment checks.

deploy/compose/check and deploy/k8s/validate compare what compose.yaml and
the Kubernetes manifests give the services with the settings table of
docs/configuration.md
(between `<!-- settings:` and `<!-- end of settings -->`), which
tests/system/readme.rs checks against the binaries themselves: every
variable either binary reads, which binary reads it and its default. The
paragraph right after the table names the variables the OpenTelemetry SDK
reads on its own (OTEL_SERVICE_NAME, ...); they are accepted too.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "docs" / "configuration.md"
SERVICES = ("user-service", "order-service")
READERS = {"both": set(SERVICES), "user": {"user-service"}, "order": {"order-service"}}


class Settings:
    """The settings table of docs/configuration.md, per service."""

    def __init__(self, readme=README):
        text = Path(readme).read_text(encoding="utf-8")
        start = text.find("<!-- settings:")
        end = text.find("<!-- end of settings -->")
        if start < 0 or end < start:
            raise ValueError(f"{readme}: no settings table between its markers")
        self.readers = {}  # variable -> services that read it
        self.defaults = {}  # (service, variable) -> default, or None when unset
        for line in text[start:end].splitlines():
            if not line.startswith("| `"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            variables = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
            read_by = READERS.get(cells[2])
            if not variables or read_by is None:
                raise ValueError(f"{readme}: cannot read the settings row {line!r}")
            per_service = {short: value for value, short in re.findall(r"`([^`]*)` \((user|order)\)", cells[1])}
            plain = re.fullmatch(r"`([^`]*)`", cells[1])
            for variable in variables:
                self.readers[variable] = read_by
                for service in read_by:
                    short = service.split("-")[0]
                    if short in per_service:
                        self.defaults[(service, variable)] = per_service[short]
                    elif plain:
                        self.defaults[(service, variable)] = plain.group(1)
                    else:
                        self.defaults[(service, variable)] = None
        after = text[end:].split("\n\n")
        sdk_paragraph = after[1] if len(after) > 1 else ""
        self.sdk = set(re.findall(r"`(OTEL_[A-Z0-9_]+)`", sdk_paragraph))
        if not self.readers or not self.sdk:
            raise ValueError(f"{readme}: the settings table or the SDK's variables after it are missing")

    def reads(self, service, variable):
        """Whether `service`'s binary (or its OpenTelemetry SDK) reads `variable`."""
        return service in self.readers.get(variable, ()) or variable in self.sdk

    def value(self, service, variable, env):
        """The value `service` runs with: from `env` (a mapping), else its default."""
        if variable in env:
            return env[variable]
        return self.defaults.get((service, variable))

    def port(self, service, variable, env):
        """The port of an address setting (GRPC_ADDR, ADMIN_ADDR) as `service` runs with it."""
        return address_port(self.value(service, variable, env))

    def listens(self, service, env):
        """{"grpc": port, "admin": port} of `service` with `env`."""
        return {
            "grpc": self.port(service, "GRPC_ADDR", env),
            "admin": self.port(service, "ADMIN_ADDR", env),
        }


def address_port(address):
    """The port of `host:port` or `[v6]:port`, or None."""
    match = re.fullmatch(r"(?:\[[^\]]*\]|[^:]*):(\d+)", str(address or ""))
    return int(match.group(1)) if match else None


def service_of_image(image):
    """`user-service` or `order-service` for an image of this repository
    (shop/user-service:tag, registry.example.com/shop/order-service:tag), else None."""
    name = str(image or "").rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    return name if name in SERVICES else None


def workspace_version():
    """The workspace version (Cargo.toml's [workspace.package] version): the
    tag of every image of this repository (`v<version>` in git)."""
    import tomllib

    cargo = tomllib.loads((Path(__file__).resolve().parent.parent / "Cargo.toml").read_text(encoding="utf-8"))
    return cargo["workspace"]["package"]["version"]


def image_tag(image):
    """The tag of an image reference (None without one)."""
    name = str(image or "").split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else None


def expansions(value):
    """The `$(NAME)` references Kubernetes expands in an env value."""
    return re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(value or ""))


DEFAULT_PORTS = {"postgres": 5432, "postgresql": 5432, "amqp": 5672, "amqps": 5671, "http": 80, "https": 443}


def url_ports(value):
    """The port of every URL of a comma-separated list (AMQP_URL may name
    the nodes of a cluster), skipping entries whose port cannot be told."""
    ports = (url_port(entry.strip()) for entry in str(value or "").split(","))
    return [port for port in ports if port is not None]


def url_port(url):
    """The port a URL connects to (written, else its scheme's default), or None.
    `$(NAME)` expansions in the host part are fine: only the port is read."""
    match = re.match(r"([a-z][a-z0-9+.-]*)://(?:[^@/]*@)?(\[[^\]]*\]|[^:/?#]*)(?::(\d+))?", str(url or ""))
    if not match:
        return None
    scheme, _, port = match.groups()
    return int(port) if port else DEFAULT_PORTS.get(scheme)
