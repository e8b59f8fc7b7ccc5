"""Real services for tests: the ones the environment names, or private ones started here.

A private Mosquitto runs with the project's own generated config (mqtt_worker.broker_files) on a
free port: anonymous by default, or with the accounts `manage.py mqtt_auth export` writes and
the TLS listener of the development CA (bin/dev-ca); it can be stopped, restarted, reloaded and
killed for fault tests. A private Redis likewise.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def url_reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    return port_open(parts.hostname or "127.0.0.1", parts.port or default_port)


def _hand_to_mosquitto_user(folder: Path) -> None:
    """Mosquitto started as root drops to the `mosquitto` user, which must be able to write its
    persistence file; otherwise queued messages would silently not survive a restart."""
    if os.geteuid() != 0:
        return
    try:
        shutil.chown(folder, "mosquitto", "mosquitto")
    except (LookupError, PermissionError):
        return
    for path in folder.iterdir():
        shutil.chown(path, "mosquitto", "mosquitto")


def dev_ca(directory: Path):
    """The development CA and broker certificate (bin/dev-ca, as `make run` makes them)."""
    from mqtt_worker.broker_files import Tls

    subprocess.run([str(ROOT / "bin" / "dev-ca"), str(directory)], check=True, timeout=60)
    return Tls(directory / "ca.crt", directory / "server.crt", directory / "server.key")


@dataclass
class PrivateMosquitto:
    """A Mosquitto process of our own, with the project's generated config and persistence.
    `secure=True`: no anonymous access, the accounts in `auth_dir` (write them with
    `manage.py mqtt_auth export --dir <auth_dir>`), and TLS with the development CA."""

    port: int = field(default_factory=free_port)
    extra_config: str = ""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mosq-")))
    secure: bool = False
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.secure else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def auth_dir(self) -> Path:
        return self.workdir / "auth"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "tls" / "ca.crt"

    def _write_config(self) -> Path:
        from mqtt_worker.broker_files import broker_config, write_auth_files

        tls = None
        if self.secure:
            tls = dev_ca(self.workdir / "tls")
            if not (self.auth_dir / "passwd").exists():
                write_auth_files(self.auth_dir, meters=[], services=[])
        config = self.workdir / "mosquitto.conf"
        text = broker_config(port=self.port, bind="127.0.0.1", persistence_dir=self.workdir,
                             auth_dir=self.auth_dir if self.secure else None, tls=tls)
        config.write_text(f"{text}\n{self.extra_config}\n")
        return config

    def reload(self) -> None:
        """SIGHUP: the broker re-reads its password and ACL files (no restart)."""
        from mqtt_worker.broker_files import reload_broker

        pid_file = self.workdir / "test.pid"
        pid_file.write_text(str(self.process.pid))
        if not reload_broker(pid_file):
            raise RuntimeError("the private broker did not take SIGHUP")

    def start(self) -> "PrivateMosquitto":
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        config = self._write_config()
        _hand_to_mosquitto_user(self.workdir)
        log = open(self.workdir / "mosquitto.log", "ab")
        self.process = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=log, stderr=log)
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        """A clean stop: Mosquitto saves its persistence file on SIGTERM."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PrivateRedis:
    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="redis-")))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PrivatePostgres:
    """A throw-away PostgreSQL cluster from the system's binaries (initdb + pg_ctl).

    PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
    """

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pg-")))

    @staticmethod
    def bindir() -> Path | None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        return found[-1].parent if found else None

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def start(self) -> "PrivatePostgres":
        bindir = self.bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        data = self.workdir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.workdir / "log"), "-w", "start")
        wait_for_port("127.0.0.1", self.port)
        return self

    def close(self) -> None:
        bindir = self.bindir()
        if bindir is not None and (self.workdir / "data").exists():
            try:
                self._run(str(bindir / "pg_ctl"), "-D", str(self.workdir / "data"), "-m", "immediate", "stop")
            except subprocess.SubprocessError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


class FakeServerProcess:
    """A running fake (Daraja, Firebase) and its `/__fake__/` control endpoints."""

    def __init__(self, port: int, process: subprocess.Popen):
        self.port = port
        self.process = process
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"

    def control(self, action: str, **body) -> dict:
        import httpx

        response = httpx.post(f"{self.url}/__fake__/{action}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/__fake__/state", timeout=10).json()


@contextmanager
def module_server(module: str, *args: str, name: str):
    """Run `python -m <module> --port <free port> …` (the project's fake Daraja, fake Firebase)
    for the duration of the block; yields (port, process). Logs go to var/ when it exists."""
    port = free_port()
    log = open(ROOT / "var" / f"{name}-{port}.log", "ab") if (ROOT / "var").is_dir() else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT, stdout=log, stderr=log
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def subprocess_database_url() -> str:
    """DATABASE_URL for a process a test starts (a worker, a web server): the TEST database,
    on the server the suite uses. Call once the test database exists."""
    from django.db import connection

    db = connection.settings_dict
    credentials = db["USER"] or "postgres"
    if db["PASSWORD"]:
        credentials += f":{db['PASSWORD']}"
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def require_services() -> bool:
    return os.environ.get("REQUIRE_SERVICES") == "1"
