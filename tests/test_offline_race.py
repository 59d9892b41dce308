"""A shut-off domain started just as pullbackd opens its images (offline.py): libvirt's hook
let the start through before the daemon's marker was written, so pullbackd must see it
after, and start no daemon. Over a stub of libvirt; no daemon runs (`_launch` records)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from pullbackd.chain import Base
from pullbackd.domainfiles import Reader
from pullbackd.errors import LibvirtError
from pullbackd.model import Job, JobState, now
from pullbackd.names import Layout
from pullbackd.offline import OfflineSource
from pullbackd.qsd import Image, StorageDaemon, StorageDaemonError
from pullbackd.source import Plan
from pullbackd.virt import Domain, Virt

pytestmark = pytest.mark.asyncio

XML = ("<domain><name>vm</name><devices><disk type='block' device='disk'>"
       "<driver name='qemu' type='qcow2'/><source dev='/dev/vg/vm-vda'/>"
       "<target dev='vda' bus='virtio'/></disk></devices></domain>")


class StartingVirt(Virt):
    """libvirt with one domain, `vm`, shut off at the first look and running from the
    second on (started between them); `markers` says, at each look, whether a daemon's
    marker was there."""

    def __init__(self, layout: Layout) -> None:
        super().__init__("test:///fake")
        self._layout = layout
        self.markers: list[bool] = []

    async def domain(self, name: str, definition: bool = False) -> Domain:
        self.markers.append(any(self._layout.qemu.glob("*.domain")))
        return Domain(name, len(self.markers) > 1, XML)


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The domains a daemon was launched for (none is: it would hold the images)."""
    domains: list[str] = []

    async def launch(self: StorageDaemon, domain: str, images: Sequence[Image]) -> None:
        domains.append(domain)
        raise StorageDaemonError("launched")

    monkeypatch.setattr(StorageDaemon, "_launch", launch)
    return domains


def source(tmp_path: Path) -> tuple[OfflineSource, StartingVirt, Layout]:
    layout = Layout(tmp_path / "exports", tmp_path / "scratch")
    layout.qemu.mkdir(parents=True)
    virt = StartingVirt(layout)
    return OfflineSource(virt, layout, Reader(virt, tmp_path / "libvirt")), virt, layout


async def test_a_domain_started_as_its_backup_begins_gets_no_daemon(
        tmp_path: Path, launched: list[str]) -> None:
    """Off when the backup begins, started before its marker was written (the hook saw
    none): the backup fails, saying so, no daemon is launched, no marker is left."""
    offline, virt, layout = source(tmp_path)
    job = Job("0123456789ab", "vm", JobState.STARTING, "full", now(), checkpoint="c1",
              offline=True)
    plan = Plan(("vda",), (), {"vda": 1 << 20}, offline=True)
    with pytest.raises(LibvirtError) as raised:
        await offline.begin(job, plan, {"vda": Base(None)})
    assert launched == []
    assert "'vm' started meanwhile; start the backup again" in str(raised.value)
    assert virt.markers == [False, True]  # looked again once the marker was there
    assert list(layout.qemu.iterdir()) == []


async def test_a_domain_started_as_its_bitmaps_are_removed_gets_no_daemon(
        tmp_path: Path, launched: list[str]) -> None:
    """The same for the daemon that takes a deleted checkpoint's bitmaps out (`forget`)."""
    offline, virt, layout = source(tmp_path)
    with pytest.raises(LibvirtError) as raised:
        await offline.forget("vm", ["vda"], "c1")
    assert launched == []
    assert "'vm' runs now" in str(raised.value)
    assert virt.markers == [False, True]
    assert list(layout.qemu.iterdir()) == []
