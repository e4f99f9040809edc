"""The install path (packaging/build.sh → install.sh, docs/install.md) run into a scratch root:
users and groups, a production-only venv from the locked requirements, files, modes and owners,
the unit verified and its exposure scored as installed, both broker layouts, then upgrade
(data and configuration kept), rollback, uninstall and purge."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import hostsetup
from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer runs as root (CI runs as root)")


def _tool(name: str, package: str) -> str:
    """A host tool the test needs; installed from Debian like dev.sh's apt_install, never skipped."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env, timeout=600)
        found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert found is not None, f"{name} is required ({package}); ./dev.sh test installs it"
    return found


def _uv() -> str:
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(ROOT / ".tools" / "bin" / "uv")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("uv not found: run through ./dev.sh test (it exports UV) or set UV=")


@dataclass
class Bundles:
    first: Path
    second: Path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """Two release bundles of this tree (built once): the install and the upgrade."""
    out = tmp_path_factory.mktemp("dist")
    made = []
    for build in ("ci1", "ci2"):
        proc = subprocess.run(
            [str(ROOT / "packaging" / "build.sh"), "--out", str(out), "--build", build],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            env={**os.environ, "UV": _uv()},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        made.append(Path(proc.stdout.strip().splitlines()[-1]))
    return Bundles(*made)


STOCK_MAIN_CONF = "[General]\n#ControllerMode = dual\n#JustWorksRepairing = never\n[GATT]\n#KeySize = 0\n"


def scratch_root(tmp: Path) -> Path:
    """An empty system: root in passwd/group/shadow, BlueZ's stock settings, one DNS server,
    and the host's systemd units (what the unit's After=/Wants= name) for verify."""
    r = tmp / "root"
    (r / "etc" / "bluetooth").mkdir(parents=True)
    (r / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (r / "etc" / "group").write_text("root:x:0:\n")
    for name, line in (("shadow", "root:*:19000:0:99999:7:::\n"), ("gshadow", "root:*::\n")):
        (r / "etc" / name).write_text(line)
        (r / "etc" / name).chmod(0o600)
    (r / "etc" / "bluetooth" / "main.conf").write_text(STOCK_MAIN_CONF)
    (r / "etc" / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    units = next(p for p in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")) if p.is_dir())
    shutil.copytree(units, r / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return r


def install(bundle: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(bundle / "install.sh"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "DESTDIR": str(root), "UV": _uv(), "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def ids(root: Path, db: str, name: str) -> list[str]:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} not in {db}")


def mode_owner(path: Path) -> tuple[str, int, int]:
    st = path.lstat()
    return oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid


@pytest.fixture(scope="module")
def installed_once(bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One install the read-only checks share."""
    root = scratch_root(tmp_path_factory.mktemp("once"))
    install(bundles.first, root)
    return root


@pytest.fixture
def installed(bundles: Bundles, tmp_path: Path) -> Path:
    """An install of its own, for a test that changes it."""
    root = scratch_root(tmp_path)
    install(bundles.first, root)
    return root


def test_install_creates_the_user_the_venv_and_the_files_with_their_modes(
    installed_once: Path, bundles: Bundles
) -> None:
    r = installed_once
    user, group, bt = ids(r, "passwd", "lockgw"), ids(r, "group", "lockgw"), ids(r, "group", "bluetooth")
    uid, gid = int(user[2]), int(group[2])
    assert user[3] == group[2] and user[6] == "/usr/sbin/nologin" and uid < 1000  # a system user
    assert "lockgw" in bt[3].split(",")  # BlueZ's D-Bus policy admits the bluetooth group

    assert mode_owner(r / "etc" / "lockgw") == ("0o750", 0, gid)
    assert mode_owner(r / "etc" / "lockgw" / "lockgw.toml") == ("0o640", 0, gid)
    assert (r / "etc/lockgw/lockgw.toml").read_text() == (ROOT / "config/lockgw.toml").read_text()
    assert mode_owner(r / "var" / "lib" / "lockgw") == ("0o700", uid, gid)
    assert mode_owner(r / "etc/systemd/system/lockgw.service")[0] == "0o644"
    assert Path(r / "usr/local/bin/lockgw").readlink().as_posix() == "/opt/lockgw/current/bin/lockgw"

    release = (bundles.first / "RELEASE").read_text().strip()
    assert Path(r / "opt/lockgw/current").readlink().as_posix() == f"releases/{release}"
    venv = r / "opt/lockgw/current"
    site = next((venv / "lib").glob("python3.*/site-packages"))
    present = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"lockgw", "bumble", "pynacl", "cryptography", "aiomqtt", "pydantic"} <= present
    assert not present & {"pytest", "ruff", "mypy", "hypothesis", "coverage", "cwt", "import_linter"}
    # the scripts name the venv where it runs, not the scratch root
    assert (venv / "bin" / "lockgw").read_text().splitlines()[
        0
    ] == f"#!/opt/lockgw/releases/{release}/bin/python"
    assert not any(stat.S_IMODE(p.stat().st_mode) & 0o022 for p in venv.rglob("*") if not p.is_symlink())
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "gateway.cli.main",
            "config",
            "check",
            str(r / "etc/lockgw/lockgw.toml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # the example names /etc/lockgw/root-1.pub, which the technician installs: the check says so
    assert proc.returncode == 2 and "root-1.pub" in proc.stderr + proc.stdout
    assert (venv / "doc" / "install.md").is_file()  # the unit's Documentation=

    # BlueZ: hardened, the original kept beside it
    main_conf = (r / "etc/bluetooth/main.conf").read_text()
    assert hostsetup.bluez_problems(main_conf) == []
    assert (r / "etc/bluetooth/main.conf.lockgw-orig").read_text() == STOCK_MAIN_CONF


def test_install_is_idempotent(installed_once: Path, bundles: Bundles) -> None:
    installed = installed_once

    def snapshot() -> dict[str, tuple[str, int, int, bytes]]:
        out = {}
        for p in sorted(installed.rglob("*")):
            if "usr/lib/systemd" in str(p):
                continue
            data = (
                p.read_bytes()
                if p.is_file() and not p.is_symlink()
                else Path(p).readlink().as_posix().encode()
                if p.is_symlink()
                else b""
            )
            out[str(p.relative_to(installed))] = (*mode_owner(p), data)
        return out

    before = snapshot()
    again = install(bundles.first, installed)
    assert "already installed" in again.stderr
    assert snapshot() == before


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("systemd-analyze", "systemd"), *args], capture_output=True, text=True, check=False, timeout=120
    )


def exposure(root: Path) -> float:
    proc = systemd_analyze("security", "--offline=true", f"--root={root}", "--threshold=20", "lockgw.service")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = re.search(r"Overall exposure level for lockgw\.service: ([0-9.]+)", proc.stdout)
    assert found is not None, proc.stdout[-2000:]
    return float(found.group(1))


def test_installed_unit_verifies_and_its_exposure_is_at_most_2(installed_once: Path) -> None:
    installed = installed_once
    proc = systemd_analyze("verify", f"--root={installed}", "lockgw.service")
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr  # warnings count too
    score = exposure(installed)
    assert score <= 2.0
    unit = (installed / "etc/systemd/system/lockgw.service").read_text()
    documented = re.search(r"^Documentation=file://(\S+)$", unit, re.MULTILINE)
    assert documented is not None
    target = installed / documented.group(1).lstrip("/")
    assert target.is_file(), documented.group(1)  # through the current link, inside the root
    execstart = re.search(r"^ExecStart=(\S+)", unit, re.MULTILINE)
    assert execstart is not None and (installed / execstart.group(1).lstrip("/")).exists()


def write_config(root: Path, url: str) -> Path:
    conf = root / "etc/lockgw/lockgw.toml"
    conf.write_text(
        re.sub(r'^url = "[^"]*"', f'url = "{url}"', conf.read_text(), count=1, flags=re.MULTILINE)
    )
    return conf


def unit_texts(root: Path) -> list[str]:
    texts = hostsetup.read_unit_texts(root)
    assert texts is not None
    return texts


def test_both_layouts_local_broker_and_direct_tls_to_central(installed_once: Path, bundles: Bundles) -> None:
    r = installed_once
    conf = r / "etc/lockgw/lockgw.toml"
    saved = conf.read_text()
    try:
        check_both_layouts(r, bundles)
    finally:
        conf.write_text(saved)
        install(bundles.first, r, "reconfigure")


def check_both_layouts(r: Path, bundles: Bundles) -> None:
    local = load_config(r / "etc/lockgw/lockgw.toml", env={}, check_files=False)
    assert hostsetup.check_broker_allowed(local, unit_texts(r)).status == "pass"

    # direct mqtts:// to central: the base unit alone admits localhost only — doctor says so …
    conf = write_config(r, "mqtts://203.0.113.7:8883")
    direct = load_config(conf, env={}, check_files=False)
    base_only = [(r / "etc/systemd/system/lockgw.service").read_text()]
    warned = hostsetup.check_broker_allowed(direct, base_only)
    assert warned.status == "warn" and "203.0.113.7" in warned.detail and "reconfigure" in warned.fix
    assert hostsetup.check_broker_allowed(direct, unit_texts(r)).status == "warn"  # the old drop-in
    # … and reconfigure writes the drop-in that admits it
    install(bundles.first, r, "reconfigure")
    dropin = (r / "etc/systemd/system/lockgw.service.d/50-broker.conf").read_text()
    assert "IPAddressAllow=203.0.113.7" in dropin and "/etc/lockgw/lockgw.toml" in dropin
    assert "192.0.2.53" not in dropin  # an address literal needs no DNS
    assert hostsetup.check_broker_allowed(direct, unit_texts(r)).status == "pass"
    assert systemd_analyze("verify", f"--root={r}", "lockgw.service").stderr.strip() == ""
    assert exposure(r) <= 2.0

    # a broker by name: its resolved addresses and the DNS servers that resolve it
    write_config(r, "mqtts://localhost:8883")
    install(bundles.first, r, "reconfigure")
    dropin = (r / "etc/systemd/system/lockgw.service.d/50-broker.conf").read_text()
    assert "IPAddressAllow=127.0.0.1" in dropin and "IPAddressAllow=192.0.2.53" in dropin


def test_upgrade_keeps_data_and_config_rollback_and_uninstall(installed: Path, bundles: Bundles) -> None:
    r = installed
    first = (bundles.first / "RELEASE").read_text().strip()
    second = (bundles.second / "RELEASE").read_text().strip()
    conf = r / "etc/lockgw/lockgw.toml"
    conf.write_text(conf.read_text().replace("gw-sandviken-1", "gw-edited"))
    data = r / "var/lib/lockgw"
    (data / "events.sqlite3").write_bytes(b"the epoch lives here")
    (data / "events.sqlite3").chmod(0o600)

    install(bundles.second, r, "upgrade")
    assert Path(r / "opt/lockgw/current").readlink().as_posix() == f"releases/{second}"
    assert Path(r / "opt/lockgw/previous").readlink().as_posix() == f"releases/{first}"
    assert "gw-edited" in conf.read_text()  # the configuration is never overwritten
    assert (data / "events.sqlite3").read_bytes() == b"the epoch lives here"
    assert mode_owner(data / "events.sqlite3")[0] == "0o600"

    install(r / "opt/lockgw/current", r, "rollback")  # the installed copy (docs/install.md)
    assert Path(r / "opt/lockgw/current").readlink().as_posix() == f"releases/{first}"
    install(bundles.second, r, "upgrade")  # forward again: the release is already built
    assert Path(r / "opt/lockgw/current").readlink().as_posix() == f"releases/{second}"

    install(r / "opt/lockgw/current", r, "uninstall")
    assert not (r / "opt/lockgw").exists() and not (r / "etc/systemd/system/lockgw.service").exists()
    assert not (r / "usr/local/bin/lockgw").is_symlink()
    assert "gw-edited" in conf.read_text() and (data / "events.sqlite3").exists()
    assert ids(r, "passwd", "lockgw")

    install(bundles.second, r, "uninstall", "--purge")
    assert not (r / "etc/lockgw").exists() and not data.exists()
    assert "lockgw:" not in (r / "etc/passwd").read_text() + (r / "etc/group").read_text()
    assert (r / "etc/bluetooth/main.conf").read_text() == STOCK_MAIN_CONF


def test_a_scratch_root_with_a_quote_and_a_bar_installs_and_reconfigures(
    bundles: Bundles, tmp_path: Path
) -> None:
    """Attack (round 2). Found: the root path went into sed expressions (``s|$R$CONF|$CONF|``
    and the venv scripts' shebangs), so a ``|`` in DESTDIR ended the installer with a sed
    error; both are now replaced as literal text."""
    root = scratch_root(tmp_path / "it's|here")
    install(bundles.first, root)
    lockgw = (root / "opt/lockgw/current/bin/lockgw").read_text()
    assert lockgw.startswith("#!/opt/lockgw/releases/") and str(root) not in lockgw
    install(bundles.first, root, "reconfigure")
    dropin = (root / "etc/systemd/system/lockgw.service.d/50-broker.conf").read_text()
    assert dropin.startswith("# Written by packaging/install.sh from /etc/lockgw/lockgw.toml: "), dropin
    assert all(line.startswith(("#", "[Service]", "IPAddressAllow=")) for line in dropin.splitlines())


def test_a_scratch_root_with_spaces_is_refused_before_anything_is_built(
    bundles: Bundles, tmp_path: Path
) -> None:
    """Attack (round 2). Found: under a DESTDIR with spaces uv writes /bin/sh trampolines
    naming that path into the venv's scripts, which would not run once installed."""
    root = scratch_root(tmp_path / "a dir")
    proc = subprocess.run(
        [str(bundles.first / "install.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "DESTDIR": str(root), "UV": _uv(), "PYTHON": sys.executable},
    )
    assert proc.returncode == 1 and "DESTDIR must not contain whitespace" in proc.stderr, proc.stderr
    assert not (root / "opt").exists()
