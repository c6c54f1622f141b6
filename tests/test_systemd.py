"""The systemd unit, sysusers and tmpfiles files under systemd/."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "dynaconnd.service"
SYSUSERS = SYSTEMD / "dynaconnd.sysusers"
TMPFILES = SYSTEMD / "dynaconnd.tmpfiles"
INSTALLED_BINARY = "/usr/bin/dynaconnd"

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _tool(name: str) -> str:
    """Return the path of ``name``; skip if missing (fail if CI=true)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install systemd)"
        if IN_CI:
            pytest.fail(f"{reason} and CI=true")
        pytest.skip(reason)
    return path


def _read_unit(text: str) -> configparser.ConfigParser:
    """Parse unit-file ``text`` as systemd reads its simple cases."""
    parser = configparser.ConfigParser(
        strict=False,
        interpolation=None,
        comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
    )
    # Unit keys are case-sensitive.
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # A trailing backslash continues a line; configparser keeps the
    # indented rest as a second line of the value.
    parser.read_string(text.replace("\\\n", " "))
    return parser


@pytest.fixture(scope="module")
def service() -> configparser.SectionProxy:
    """Return the [Service] section of the shipped unit."""
    return _read_unit(UNIT.read_text())["Service"]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False
    )


def _unit_for_this_venv(tmp_path: Path) -> Path:
    """Copy the unit into ``tmp_path`` with ExecStart on this venv's binary.

    ``systemd-analyze verify`` fails a unit whose ExecStart= is not an
    executable file, and /usr/bin/dynaconnd exists only once installed.
    It does not look up User= (systemd 252), so that is left as shipped:
    test_sysusers_and_tmpfiles_create_user_and_config_folder covers it.
    """
    binary = shutil.which("dynaconnd", path=str(Path(sys.executable).parent))
    assert binary is not None, "dynaconnd is not installed in this venv"
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    unit = tmp_path / "dynaconnd.service"
    unit.write_text(text.replace(INSTALLED_BINARY, binary))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a single warning."""
    analyze = _tool("systemd-analyze")
    unit = _unit_for_this_venv(tmp_path)

    result = _run(analyze, "verify", str(unit))

    # verify exits 0 on unknown keys and bad values and only prints them.
    assert ("", 0) == (result.stderr, result.returncode)


def test_systemd_analyze_verify_reports_a_misspelt_key(
    tmp_path: Path,
) -> None:
    """The empty-stderr check above would catch a misspelt key."""
    analyze = _tool("systemd-analyze")
    unit = _unit_for_this_venv(tmp_path)
    unit.write_text(
        unit.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
    )

    result = _run(analyze, "verify", str(unit))

    assert "Unknown key 'ProtectClok'" in result.stderr


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure 2.0 or lower."""
    analyze = _tool("systemd-analyze")
    unit = _unit_for_this_venv(tmp_path)

    # The threshold is on a 0-100 scale; the report shows 0.0-10.0.
    result = _run(
        analyze, "security", "--offline=yes", "--threshold=20", str(unit)
    )

    assert 0 == result.returncode, result.stdout[-2000:]


def test_unit_is_a_notify_service_reloaded_by_sighup(
    service: configparser.SectionProxy,
) -> None:
    """The unit is Type=notify, main-process only, and reloads on HUP."""
    assert {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    } == {
        key: service.get(key) for key in ("Type", "NotifyAccess", "ExecReload")
    }


def test_exec_start_flags_are_accepted_by_dynaconnd(
    service: configparser.SectionProxy,
) -> None:
    """ExecStart passes the config file and client group the parser takes."""
    from dynaconnd.__main__ import _parser

    argv = shlex.split(service["ExecStart"])
    args = _parser().parse_args(argv[1:])

    assert INSTALLED_BINARY == argv[0]
    assert ("/etc/dynaconnd/source.ini", "dynaconn", False) == (
        args.config,
        args.group,
        args.check,
    )


def test_exec_start_leaves_socket_and_state_to_systemd_directories(
    service: configparser.SectionProxy,
) -> None:
    """Socket and state paths come from $RUNTIME_/$STATE_DIRECTORY."""
    argv = shlex.split(service["ExecStart"])

    assert [] == [
        flag
        for flag in ("--socket", "--authkey-file", "--state-dir")
        if flag in argv
    ]


def test_unit_runs_unprivileged_with_its_own_directories(
    service: configparser.SectionProxy,
) -> None:
    """The unit names its user and the runtime, state and config folders."""
    expected = {
        "User": "dynaconn",
        "Group": "dynaconn",
        "UMask": "0027",
        "RuntimeDirectory": "dynaconnd",
        "RuntimeDirectoryMode": "0750",
        "RuntimeDirectoryPreserve": "restart",
        "StateDirectory": "dynaconnd",
        "ConfigurationDirectory": "dynaconnd",
    }

    assert expected == {key: service.get(key) for key in expected}


def test_unit_watchdog_restart_and_stop_timeout(
    service: configparser.SectionProxy,
) -> None:
    """The watchdog, restart policy and stop timeout are set."""
    expected = {
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "TimeoutStopSec": "15s",
    }

    assert expected == {key: service.get(key) for key in expected}


def test_unit_is_hardened(service: configparser.SectionProxy) -> None:
    """Every hardening setting is present with its intended value."""
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "ProtectProc": "invisible",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }

    assert expected == {key: service.get(key) for key in expected}


def test_unit_allows_unix_and_ip_sockets_only(
    service: configparser.SectionProxy,
) -> None:
    """Databases are reached over TCP (v4 and v6) or local Unix sockets."""
    families = service["RestrictAddressFamilies"].split()

    assert ["AF_INET", "AF_INET6", "AF_UNIX"] == sorted(families)


def test_unit_shows_a_commented_credential_example() -> None:
    """The unit shows how to load a password as a systemd credential."""
    lines = UNIT.read_text().splitlines()

    assert (
        "#LoadCredential=crm-password:/etc/dynaconnd/secrets/crm-password"
        in lines
    )


def test_unit_is_started_at_boot() -> None:
    """Enabling the unit hooks it into multi-user.target."""
    unit = _read_unit(UNIT.read_text())

    assert "multi-user.target" == unit["Install"]["WantedBy"]


def test_sysusers_and_tmpfiles_create_user_and_config_folder(
    tmp_path: Path,
) -> None:
    """Installing both files yields the user and a 0750 root:dynaconn /etc."""
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown the folders")
    (tmp_path / "etc").mkdir()

    created = _run(sysusers, f"--root={tmp_path}", str(SYSUSERS))
    assert 0 == created.returncode, created.stderr
    made = _run(tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES))
    assert 0 == made.returncode, made.stderr

    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    user = passwd["dynaconn"]
    assert (str(groups["dynaconn"]), "/var/lib/dynaconnd") == (
        user[3],
        user[5],
    )
    config = (tmp_path / "etc/dynaconnd").stat()
    secrets = (tmp_path / "etc/dynaconnd/secrets").stat()
    assert [(0o750, 0, groups["dynaconn"]), (0o700, 0, 0)] == [
        (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid),
        (stat.S_IMODE(secrets.st_mode), secrets.st_uid, secrets.st_gid),
    ]


def test_runtime_directory_is_where_the_daemon_serves(
    service: configparser.SectionProxy,
) -> None:
    """The daemon's default socket and key live in RuntimeDirectory=."""
    from dynaconnd import server

    runtime = f"/run/{service['RuntimeDirectory']}"
    environ = {"RUNTIME_DIRECTORY": runtime}

    assert (
        "/run/dynaconnd/dynaconnd.sock",
        "/run/dynaconnd/authkey",
        f"{server.GROUP_FOLDER_MODE:04o}",
    ) == (
        server.default_socket_path(environ),
        server.default_authkey_path(environ),
        service["RuntimeDirectoryMode"],
    )
