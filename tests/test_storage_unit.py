"""The layers a shut-off domain's backup opens under an image (qsd.layered), the same whoever
runs its qemu-storage-daemon: the root unit (storage_unit.images, libvirt's answer stubbed)
or pullbackd itself (offline.py). They are those the domain's definition names: an image
header that names another file (a backing file, an external data file) is refused before
anything opens that file, on real qemu-img images."""

from __future__ import annotations

import subprocess
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import nbd
import pytest

from pullbackd import offline, qsd, storage_unit, virt, xml
from pullbackd.chain import Base
from pullbackd.qsd import Export, Found, Image, StorageDaemon, StorageDaemonError
from pullbackd.virt import Domain

pytestmark = pytest.mark.asyncio

SECRET = b"root:$6$SECRETHASH:19000:0:99999:7:::\n".ljust(1 << 20, b"\0")
MODES = ["unit", "pullbackd"]


def definition(image: Path, backing: str) -> str:
    """A shut-off domain with one qcow2 disk, vda, at `image`, its <backingStore> `backing`
    ("" for none: libvirt follows the header)."""
    return f"""<domain type='kvm'><name>vm</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='{image}'/>{backing}<target dev='vda' bus='virtio'/></disk>
</devices></domain>"""


class Spy:
    """What the layers' check had qemu-img open, and whether a daemon was launched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.qemu_img: list[list[str]] = []
        self.launched = 0
        real_run, real_command = subprocess.run, StorageDaemon.command

        def run(argv: list[str], **kwargs: Any) -> Any:
            self.qemu_img.append(list(argv))
            return real_run(argv, **kwargs)

        def command(daemon: StorageDaemon, images: Sequence[Image], pidfile: bool = True
                    ) -> list[str]:
            self.launched += 1
            return real_command(daemon, images, pidfile)

        monkeypatch.setattr(qsd, "subprocess",
                            types.SimpleNamespace(**{**vars(subprocess), "run": run}))
        monkeypatch.setattr(StorageDaemon, "command", command)

    def named(self, path: Path) -> bool:
        return any(str(path) in argv for argv in self.qemu_img)


async def opened(mode: str, tmp_path: Path, domain_xml: str,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[StorageDaemon, list[Image],
                                                           dict[str, Found]]:
    """vda of the domain opened by a job's daemon, as `mode` starts it."""
    d = StorageDaemon(tmp_path / "qmp.sock", tmp_path / "nbd.sock", tmp_path / "qsd.pid")
    if mode == "unit":  # what pullbackd-storage does as root, libvirt's answer stubbed
        monkeypatch.setattr(virt, "shut_off_definition", lambda uri, name: domain_xml)
        spec: dict[str, object] = {"domain": "vm", "disks": [{"disk": "vda", "bitmap": True}]}
        _, images = await anyio.to_thread.run_sync(storage_unit.images, "qemu:///system", spec)
    else:  # OfflineSource.begin, pullbackd running the daemon itself
        images = offline._images("vm", Domain("vm", False, domain_xml), {"vda": Base(None)})
    return d, images, await d.open("vm", images)


def qcow2(path: Path, *options: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "1M"],
                   check=True)
    return path


@pytest.fixture
def shadow(tmp_path: Path) -> Path:
    """A root-only file that is no disk of the domain."""
    path = tmp_path / "shadow"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode", MODES)
async def test_a_backing_file_the_definition_does_not_name_is_refused_and_not_opened(
        tmp_path: Path, shadow: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt's definition says vda has no layer (`<backingStore/>`); its header names the
    shadow file: without the check, the shadow's bytes were served under vda."""
    image = qcow2(tmp_path / "vm.qcow2", "-b", str(shadow), "-F", "raw")
    spy = Spy(monkeypatch)
    with pytest.raises(StorageDaemonError) as refused:
        await opened(mode, tmp_path, definition(image, "<backingStore/>"), monkeypatch)
    assert str(refused.value) == (
        f"disk vda: the domain's definition names the layers under {image} as: none; its "
        f"image headers as: {shadow} (raw); refused, nothing under it opened: make them "
        "agree, fixing the image (qemu-img rebase -u) or the definition's <backingStore> "
        "(virsh edit)")
    assert not spy.named(shadow)  # not even by qemu-img
    assert spy.launched == 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_chain_the_definition_names_is_served_as_the_image(
        tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An external snapshot's overlay whose definition names its base, as its header does,
    is served through it, byte for byte; a definition naming another base is refused."""
    base = qcow2(tmp_path / "base.qcow2")
    overlay = qcow2(tmp_path / "overlay.qcow2", "-b", str(base), "-F", "qcow2")
    await anyio.run_process(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 512k",
                             str(base)])
    await anyio.run_process(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x22 256k 64k",
                             str(overlay)])
    reference = tmp_path / "reference.raw"
    await anyio.run_process(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay),
                             str(reference)])
    chain = (f"<backingStore type='file'><format type='qcow2'/><source file='{base}'/>"
             "<backingStore/></backingStore>")
    assert xml.parse_disks(definition(overlay, chain))[0].backing == ((str(base), "qcow2"),)
    d, images, found = await opened(mode, tmp_path, definition(overlay, chain), monkeypatch)
    try:
        assert found["vda"].layered
        await d.serve(images, found, "pullbackd.default.a", [Export("vda", "vda-t", None)])

        def read() -> bytes:
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///vda-t?socket={d.nbd}")
            try:
                return bytes(h.pread(h.get_size(), 0))
            finally:
                h.shutdown()

        assert await anyio.to_thread.run_sync(read) == reference.read_bytes()
    finally:
        await d.stop()
    other = qcow2(tmp_path / "other.qcow2")
    with pytest.raises(StorageDaemonError, match=f"as: {other} \\(qcow2\\); its image "
                                                 f"headers as: {base} \\(qcow2\\); refused"):
        await opened(mode, tmp_path, definition(overlay, chain.replace(str(base), str(other))),
                     monkeypatch)


@pytest.mark.parametrize("backing", ["<backingStore/>", ""])
@pytest.mark.parametrize("mode", MODES)
async def test_an_image_with_an_external_data_file_is_refused(
        tmp_path: Path, shadow: Path, mode: str, backing: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU opens a qcow2 image's data file itself (read-write, as root under the unit):
    no check of the layers covers it. It used to be opened, then failed at the reopen."""
    image = qcow2(tmp_path / "vm.qcow2", "-o",
                  f"data_file={tmp_path / 'dummy.raw'},data_file_raw=on")
    await anyio.run_process(["qemu-img", "amend", "-f", "qcow2", "-o", f"data_file={shadow}",
                             str(image)])
    spy = Spy(monkeypatch)
    with pytest.raises(StorageDaemonError) as refused:
        await opened(mode, tmp_path, definition(image, backing), monkeypatch)
    assert str(refused.value).startswith(
        f"disk vda: {image} keeps its data in an external file, {shadow}, which QEMU would "
        "open itself, for writing, outside the layers checked against the domain's "
        "definition: refused, nothing served; convert the image into one without")
    assert spy.launched == 0
