"""The TCP endpoint for remote appliances, TLS only, on the real lab."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from .conftest import Daemon, Lab, serving
from .images import Disk, MiB, assert_same
from .test_streaming import pki  # noqa: F401 (a fixture)


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)


def client_certificates(folder: Path, ca: Path, name: str) -> Path:
    """ca-cert.pem, and a client certificate signed by the CA in `ca` (a folder)."""
    folder.mkdir()
    shutil.copy(ca / "ca-cert.pem", folder / "ca-cert.pem")
    openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", "client-key.pem", "-out", "client.csr")
    (folder / "ext.cnf").write_text("extendedKeyUsage=clientAuth\n")
    openssl(folder, "x509", "-req", "-in", "client.csr", "-CA", str(ca / "ca-cert.pem"),
            "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-extfile", "ext.cnf", "-out", "client-cert.pem")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def appliance_pki(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return client_certificates(tmp_path_factory.mktemp("appliance") / "pki", pki, "appliance")


@pytest.fixture(scope="module")
def daemon(lab: Lab, pki: Path,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("pullbackd"), lab.uri, exports=(
            f'tcp_listen = "127.0.0.1:{free_port()}"\ntcp_host = "localhost"\n'
            f'tls_certificates = "{pki}"\ntls_verify_clients = true\n')) as d:
        yield d


@pytest.fixture
def job(lab: Lab, daemon: Daemon) -> Iterator[tuple[dict[str, str], Disk]]:
    vda = Disk(lab, "lab4", "vda")
    vda.write(MiB, 3 * MiB, 0x7E)
    vda.write(60 * MiB, MiB, 0x7F)
    started = daemon.ctl.job("Start", domain="lab4", disks=["vda"])
    yield started["disks"][0], vda
    daemon.ctl.call("Abort", id=started["id"])


def connect(url: str, certificates: Path | None) -> nbd.NBD:
    """libnbd's client: nbds:// requires TLS, nbd:// does without."""
    h = nbd.NBD()
    if certificates is not None:
        h.set_tls_certificates(str(certificates))
    h.connect_uri(url)
    return h


def read_all(h: nbd.NBD) -> bytes:
    size = h.get_size()
    return b"".join(h.pread(min(8 * MiB, size - o), o) for o in range(0, size, 8 * MiB))


def test_a_remote_appliance_reads_over_tls(
        daemon: Daemon, job: tuple[dict[str, str], Disk], appliance_pki: Path) -> None:
    disk, vda = job
    url = disk["remote_url"]
    assert url.startswith("nbds://localhost:") and url.endswith(f"/{disk['export']}")
    assert disk["export"].startswith("vda-") and len(disk["export"]) > 30  # unguessable
    h = connect(url, appliance_pki)
    assert h.get_tls_negotiated()
    assert_same(read_all(h), vda.expected)
    h.shutdown()
    # A second session reads the dirty extents' context too: options pass through.
    h = nbd.NBD()
    h.set_tls_certificates(str(appliance_pki))
    h.add_meta_context("base:allocation")
    h.connect_uri(url)
    assert h.can_meta_context("base:allocation")
    assert_same(h.pread(MiB, MiB), vda.expected[MiB:2 * MiB])
    h.shutdown()
    job_id = Path(disk["url"].partition("socket=")[2]).stem
    sessions = daemon.ctl.job("Get", id=job_id)["appliance"]["sessions"]
    assert [s["disk"] for s in sessions] == ["vda", "vda"]
    assert sessions[0]["peer"].startswith("tcp 127.0.0.1:")
    assert sessions[0]["peer"].endswith("cert CN=appliance")
    assert sessions[0]["bytes_read"] == len(vda.expected)


def test_plain_tcp_is_refused(job: tuple[dict[str, str], Disk]) -> None:
    disk, _ = job
    plain = disk["remote_url"].replace("nbds://", "nbd://")
    with pytest.raises(nbd.Error, match="TLS"):
        connect(plain, None)


def test_a_server_signed_by_another_ca_is_not_trusted(
        job: tuple[dict[str, str], Disk], tmp_path: Path) -> None:
    disk, _ = job
    other = tmp_path / "other-ca"
    other.mkdir()
    openssl(other, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=another CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    stranger = client_certificates(tmp_path / "stranger", other, "stranger")
    with pytest.raises(nbd.Error):
        connect(disk["remote_url"], stranger)


def test_a_client_without_a_certificate_is_refused(
        job: tuple[dict[str, str], Disk], pki: Path, tmp_path: Path) -> None:  # noqa: F811
    disk, _ = job
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pki / "ca-cert.pem", bare / "ca-cert.pem")
    with pytest.raises(nbd.Error):
        connect(disk["remote_url"], bare)


def test_an_unknown_export_is_refused_and_the_listing_is_empty(
        daemon: Daemon, job: tuple[dict[str, str], Disk], appliance_pki: Path) -> None:
    disk, _ = job
    base = disk["remote_url"].rpartition("/")[0]
    with pytest.raises(nbd.Error):
        connect(f"{base}/vda", appliance_pki)
    h = nbd.NBD()
    h.set_tls_certificates(str(appliance_pki))
    h.set_opt_mode(True)
    h.connect_uri(f"{base}/")
    listed: list[str] = []

    def seen(name: str, description: str) -> int:
        listed.append(name)
        return 0

    h.opt_list(seen)
    assert listed == []
    h.opt_abort()


def test_unauthenticated_connections_are_capped_per_address(
        daemon: Daemon, job: tuple[dict[str, str], Disk], appliance_pki: Path) -> None:
    """Someone on the network opens connections and says nothing: 8 from their address
    wait for their handshake to time out, the rest are closed at once; an appliance
    from another address reads meanwhile."""
    disk, vda = job
    port = int(disk["remote_url"].split(":")[2].split("/")[0])
    flood = []
    for _ in range(40):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        s.settimeout(5)
        flood.append(s)
    greeted = closed = 0
    for s in flood:
        data = s.recv(18)  # the greeting, or the end
        greeted += len(data) == 18
        closed += data == b""
    assert (greeted, closed) == (8, 32)
    h = connect(disk["remote_url"], appliance_pki)
    assert_same(read_all(h), vda.expected)
    h.shutdown()
    for s in flood:
        s.close()
    assert "too many connections in their handshake" in daemon.log_text()
