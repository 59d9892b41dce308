import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pullbackd import xml

DOMAIN = """<domain type='qemu'><name>d</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/>
    <source dev='/dev/sdz'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
  <disk type='file' device='disk'><source file='/v/ro.img'/><target dev='vdc'/><readonly/></disk>
</devices></domain>"""


def test_parse_disks() -> None:
    disks = xml.parse_disks(DOMAIN)
    assert [d.target for d in disks] == ["vda", "vdb", "sda", "vdc"]
    assert [d.backupable for d in disks] == [True, True, False, False]
    assert disks[0].source == "/v/a.qcow2" and disks[0].format == "qcow2"
    assert disks[1].source == "/dev/sdz" and disks[1].type == "block"


def test_pull_backup_names_every_disk() -> None:
    req = xml.BackupRequest(Path("/e/j1.sock"), {"vda": Path("/s/j1.vda.qcow2")}, skip=("vdb",))
    root = ET.fromstring(xml.backup(req))
    assert root.get("mode") == "pull"
    server = root.find("server")
    assert server is not None and server.attrib == {"transport": "unix", "socket": "/e/j1.sock"}
    disks = root.findall("disks/disk")
    assert [(d.get("name"), d.get("backup")) for d in disks] == [("vda", "yes"), ("vdb", "no")]
    scratch = disks[0].find("scratch")
    assert scratch is not None and scratch.get("file") == "/s/j1.vda.qcow2"


def test_builder_escapes_markup() -> None:
    evil = Path("/e/'><x/>.sock")
    root = ET.fromstring(xml.backup(xml.BackupRequest(evil, {})))
    server = root.find("server")
    assert server is not None and server.get("socket") == str(evil)


LIBVIRT_BACKUP = """<domainbackup mode='pull'>
  <server transport='unix' socket='/e/j1.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='c1'
          exportname='vda' exportbitmap='backup-vda' index='3'>
      <driver type='qcow2'/><scratch file='/s/j1.vda.qcow2'/></disk>
    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb' index='4'>
      <scratch file='/s/j1.vdb.qcow2'/></disk>
    <disk name='vdc' backup='no'/>
  </disks>
</domainbackup>"""


def test_incremental_and_push() -> None:
    req = xml.BackupRequest(None, {"vda": Path("/t/j.vda.qcow2"), "vdb": Path("/t/j.vdb.qcow2")},
                            since={"vda": "c1"})
    root = ET.fromstring(xml.backup(req))
    assert root.get("mode") == "push" and root.find("server") is None
    vda, vdb = root.findall("disks/disk")
    assert (vda.get("backupmode"), vda.get("incremental")) == ("incremental", "c1")
    assert (vdb.get("backupmode"), vdb.get("incremental")) == ("full", None)
    target = vdb.find("target")
    assert target is not None and target.get("file") == "/t/j.vdb.qcow2"


def test_checkpoint_round_trip() -> None:
    text = xml.checkpoint("pullbackd.a.j1", ["vda"], ("vdb",))
    assert xml.parse_checkpoint(text) == xml.CheckpointInfo("pullbackd.a.j1", None, ("vda",))
    libvirt_says = ("<domaincheckpoint><name>c2</name><parent><name>c1</name></parent>"
                    "<creationTime>1</creationTime><disks><disk name='vda' checkpoint='bitmap' "
                    "bitmap='c2'/><disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>")
    info = xml.parse_checkpoint(libvirt_says)
    assert info == xml.CheckpointInfo("c2", "c1", ("vda",), created=1)
    orphan = xml.parse_checkpoint(xml.without_parent(libvirt_says))
    assert orphan == xml.CheckpointInfo("c2", None, ("vda",), created=1)


def test_chains_libvirt_lays_out_anew_are_the_chains_written() -> None:
    """libvirt gives a domain's metadata back as it keeps it (indented, in its namespace,
    attributes in its own order): the chains are still those written, so a start does
    not rewrite it (chain.py); any other chains are not."""
    checkpoint = ("<domaincheckpoint>\n  <name>pullbackd.c.j1</name>\n  <disks>\n    "
                  "<disk name='vda' checkpoint='bitmap' bitmap='pullbackd.c.j1'/>\n  "
                  "</disks>\n</domaincheckpoint>")
    written = [xml.ChainEntry("pullbackd.c.j1", "c", "j1", "2026-01-01T00:00:00.000Z",
                              ("vda",), checkpoint, ("vda",)),
               xml.ChainEntry("pullbackd.c.j2", "c", "j2", "2026-01-02T00:00:00.000Z",
                              ("vda",), None)]
    root = ET.fromstring(xml.chains(written))
    ET.indent(root)
    for item in root:
        item.attrib = dict(reversed(item.attrib.items()))
    libvirt_says = ET.tostring(root, encoding="unicode").replace(
        "<chains>", f'<pullbackd:chains xmlns:pullbackd="{xml.CHAINS_NS}">').replace(
        "</chains>", "</pullbackd:chains>")
    found = xml.parse_chains(libvirt_says)
    assert found != written and xml.same_chains(found, written)
    assert not xml.same_chains(found, written[:1])
    assert not xml.same_chains(found[::-1], written)
    other = dataclasses.replace(written[0], xml=checkpoint.replace("'vda'", "'vdb'"))
    assert not xml.same_chains(found, [other, written[1]])


def test_parse_backup_reads_what_libvirt_chose() -> None:
    job = xml.parse_backup(LIBVIRT_BACKUP)
    assert job.socket == Path("/e/j1.sock")
    assert job.disks == (
        xml.BackupDisk("vda", "vda", "backup-vda", Path("/s/j1.vda.qcow2"), since="c1"),
        xml.BackupDisk("vdb", "vdb", None, Path("/s/j1.vdb.qcow2")),
    )


@pytest.mark.parametrize("text", [
    "<domaincheckpoint/>",
    "<domainbackup mode='pull'><server transport='tcp' name='h' port='1'/></domainbackup>",
    "<oops",
])
def test_parse_backup_rejects(text: str) -> None:
    with pytest.raises(xml.XMLError):
        xml.parse_backup(text)
