"""The broker's own files, generated: its config, its `password_file` and its `acl_file`.

No Django here: `bin/run-mosquitto` (`python -m mqtt_worker.broker_files config …`), the tests'
private brokers (devtools.services) and `deploy/mosquitto/production.conf` all come from
`broker_config()`, and `manage.py mqtt_auth` writes the account files with `write_auth_files()`.

Accounts: a meter's username is its meterNo, so one set of `%u` pattern rules gives every meter
its own topics and nobody else's (PROTOCOL.md topics); the backend's users (`backend.ingest`,
`backend.publisher`) are named with a "." that no meterNo may contain, so the patterns give them
no meter's topics. Mosquitto re-reads both files on SIGHUP and disconnects clients whose
password is gone, without a restart (tests/production/test_broker_auth.py).
"""

from __future__ import annotations

import argparse
import grp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mqtt_worker.codec import COMMAND_KINDS, REPORT_KINDS, TOPIC_PREFIX

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
PASSWORD_FILE = "passwd"
ACL_FILE = "acl"
HEADER = "# Generated from the database by `manage.py mqtt_auth export`: edits are overwritten.\n"


@dataclass(frozen=True)
class ServiceAccount:
    username: str
    password_hash: str
    can_ingest: bool
    can_publish: bool


def acl_text(services: Iterable[ServiceAccount]) -> str:
    lines = [HEADER.rstrip()]
    for account in services:
        lines.append(f"\nuser {account.username}")
        if account.can_ingest:
            # The worker subscribes plainly or through $share/<group>/…; Mosquitto checks a
            # shared subscription against the topic behind the group.
            lines += [f"topic read {TOPIC_PREFIX}/+/{kind}" for kind in REPORT_KINDS]
        if account.can_publish:
            lines += [f"topic write {TOPIC_PREFIX}/+/command/{kind}" for kind in COMMAND_KINDS]
    lines.append("\n# Every meter (username = meterNo): its own reports out, its own commands in.")
    lines += [f"pattern write {TOPIC_PREFIX}/%u/{kind}" for kind in REPORT_KINDS]
    lines += [f"pattern read {TOPIC_PREFIX}/%u/command/{kind}" for kind in COMMAND_KINDS]
    return "\n".join(lines) + "\n"


def password_text(accounts: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{username}:{password_hash}\n" for username, password_hash in accounts)


def _write_atomically(path: Path, text: str) -> bool:
    """Replace `path` with `text` (a reader sees the old file or the new, never half of one);
    False when it already held exactly that. Readable by the broker's group only: the hashes
    are not for every local user."""
    if path.exists() and path.read_text() == text:
        return False
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o640)
        _give_to_broker_group(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def _give_to_broker_group(path: Path) -> None:
    """Mosquitto started as root drops to the `mosquitto` user: as root, hand it the group."""
    if os.geteuid() != 0:
        return
    try:
        os.chown(path, -1, grp.getgrnam("mosquitto").gr_gid)
    except (KeyError, PermissionError):
        pass


def write_auth_files(directory: Path, *, meters: Iterable[tuple[str, str]], services: list[ServiceAccount]) -> bool:
    """Write `passwd` and `acl` into `directory`; True when either changed."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o750)
    _give_to_broker_group(directory)
    accounts = [(account.username, account.password_hash) for account in services]
    accounts += list(meters)
    changed = _write_atomically(directory / PASSWORD_FILE, password_text(accounts))
    return _write_atomically(directory / ACL_FILE, acl_text(services)) or changed


def _catches_sighup(pid: int) -> bool:
    """Whether the process has its SIGHUP handler installed (Linux: SigCgt in /proc). A broker
    that is still starting would be killed by the signal's default action."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    except (OSError, ValueError):
        return False
    return False


def reload_broker(pid_file: Path, *, wait_s: float = 10.0) -> bool:
    """SIGHUP to the broker named by `pid_file` (it re-reads its password and ACL files).
    False when there is no running broker there (it reads the files when it starts)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    deadline = time.monotonic() + wait_s
    while not _catches_sighup(pid):
        if time.monotonic() > deadline or not Path(f"/proc/{pid}").exists():
            return False
        time.sleep(0.05)
    os.kill(pid, signal.SIGHUP)
    return True


# --- the broker's config ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    cafile: Path
    certfile: Path
    keyfile: Path


def broker_config(
    *, port: int, bind: str | None, persistence_dir: Path, auth_dir: Path | None, tls: Tls | None,
    pid_file: Path | None = None, log_dest: str | None = None,
) -> str:
    """The project's Mosquitto config: one listener, the project's tuning (deploy/mosquitto/
    mosquitto.conf), and either accounts (`auth_dir`: password and ACL files, no anonymous) or,
    for the tests that need a plain broker, anonymous access."""
    lines = ["# Generated by mqtt_worker.broker_files.broker_config: edit that, not this.",
             "per_listener_settings false"]
    if auth_dir is None:
        lines.append("allow_anonymous true")
    else:
        lines += ["allow_anonymous false", f"password_file {auth_dir / PASSWORD_FILE}", f"acl_file {auth_dir / ACL_FILE}"]
    if pid_file is not None:
        lines.append(f"pid_file {pid_file}")
    lines.append(f"persistence_location {persistence_dir}/")
    if log_dest:
        lines.append(f"log_dest {log_dest}")
    lines.append(f"listener {port}" + (f" {bind}" if bind else ""))
    if tls is not None:
        lines += [f"cafile {tls.cafile}", f"certfile {tls.certfile}", f"keyfile {tls.keyfile}", "tls_version tlsv1.2"]
    return "\n".join(lines) + "\n\n" + BASE_CONFIG.read_text()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the project's Mosquitto config to stdout")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default=None)
    parser.add_argument("--persistence-dir", type=Path, required=True)
    parser.add_argument("--auth-dir", type=Path, default=None, help="password and ACL files; omitted: anonymous")
    parser.add_argument("--cafile", type=Path)
    parser.add_argument("--certfile", type=Path)
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--pid-file", type=Path, default=None)
    parser.add_argument("--log-dest", default=None)
    args = parser.parse_args(argv)
    tls_parts = (args.cafile, args.certfile, args.keyfile)
    if any(tls_parts) and not all(tls_parts):
        parser.error("TLS needs --cafile, --certfile and --keyfile")
    tls = Tls(*tls_parts) if all(tls_parts) else None
    sys.stdout.write(broker_config(port=args.port, bind=args.bind, persistence_dir=args.persistence_dir,
                                   auth_dir=args.auth_dir, tls=tls, pid_file=args.pid_file, log_dest=args.log_dest))


if __name__ == "__main__":
    main()
