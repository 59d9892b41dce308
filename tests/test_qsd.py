"""qemu-storage-daemon as pullbackd drives it (qsd.py), on real qcow2 images: what it
serves is the image byte for byte, its dirty bitmap names exactly what changed since a
checkpoint, a refused start leaves nothing behind, a kill -9 once it serves leaves every
bitmap usable, and QEMU cannot write the image while it serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import nbd
import pytest

from pullbackd.bitmaps import Bitmap
from pullbackd.qsd import (
    Export,
    Found,
    Image,
    StorageDaemon,
    StorageDaemonError,
    Target,
    hold_writers_off,
    new_target,
    pushed,
)

pytestmark = pytest.mark.asyncio

SIZE = 64 << 20


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def bitmaps(image: Path) -> dict[str, list[str]]:
    """The image's persistent bitmaps and their flags."""
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)], check=True,
        capture_output=True, text=True).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def read_all(url: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(url)
    try:
        size, chunk = h.get_size(), 4 << 20
        return b"".join(bytes(h.pread(min(chunk, size - at), at))
                        for at in range(0, size, chunk))
    finally:
        h.shutdown()


def dirty(url: str, context: str) -> list[tuple[int, int]]:
    """The extents the bitmap `context` marks dirty: (offset, length)."""
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(url)
    found: list[tuple[int, int]] = []
    try:
        size, offset = h.get_size(), 0
        while offset < size:
            def extent(meta: str, at: int, entries: list[int], err: int) -> int:
                nonlocal offset
                if meta == context:
                    for length, flags in zip(entries[0::2], entries[1::2], strict=True):
                        if flags & 1:
                            found.append((at, length))
                        at += length
                    offset = at
                return 0
            h.block_status(size - offset, offset, extent)
    finally:
        h.shutdown()
    return found


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)],
                   check=True)
    qemu_io(path, "write -q -P 0x11 0 1M", "write -q -P 0x22 32M 3M")
    return path


def daemon(tmp_path: Path) -> StorageDaemon:
    return StorageDaemon(tmp_path / "qmp.sock", tmp_path / "nbd.sock", tmp_path / "qsd.pid")


async def start(d: StorageDaemon, images: list[Image], checkpoint: str,
                exports: list[Export], targets: list[Target] | None = None) -> dict[str, Found]:
    """What offline.py does: open the images, then serve them."""
    found = await d.open("vm", images)
    await d.serve(images, found, checkpoint, exports, targets or [])
    return found


def url(d: StorageDaemon, export: str) -> str:
    return f"nbd+unix:///{export}?socket={d.nbd}"


async def test_a_full_export_is_the_image_and_adds_the_checkpoint(
        tmp_path: Path, image: Path) -> None:
    reference = tmp_path / "ref.raw"
    await anyio.run_process(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image),
                             str(reference)])
    d = daemon(tmp_path)
    await start(d, [Image("vda", image)], "pullbackd.default.a",
                  [Export("vda", "vda-t", None)])
    try:
        assert await d.running()
        assert await anyio.to_thread.run_sync(read_all, url(d, "vda-t")) == \
            reference.read_bytes()
    finally:
        await d.stop()
    assert not await d.running()
    assert not any(p.exists() for p in (d.qmp, d.nbd, d.pidfile, d.log, d.marker))
    # The checkpoint's bitmap is in the image, recording (libvirt's own would be "auto").
    assert bitmaps(image) == {"pullbackd.default.a": ["auto"]}


async def test_an_incremental_export_marks_exactly_what_changed(
        tmp_path: Path, image: Path) -> None:
    d = daemon(tmp_path)
    await start(d, [Image("vda", image)], "c1", [Export("vda", "vda-1", None)])
    await d.stop()
    qemu_io(image, "write -q -P 0x33 4M 64k", "write -q -P 0x44 40M 128k")
    await start(d, [Image("vda", image)], "c2", [Export("vda", "vda-2", "c1")])
    try:
        assert await anyio.to_thread.run_sync(
            dirty, url(d, "vda-2"), "qemu:dirty-bitmap:backup-vda") == [
            (4 << 20, 64 << 10), (40 << 20, 128 << 10)]
        data = await anyio.to_thread.run_sync(read_all, url(d, "vda-2"))
        assert data[4 << 20:(4 << 20) + (64 << 10)] == b"\x33" * (64 << 10)
    finally:
        await d.stop()
    assert set(bitmaps(image)) == {"c1", "c2"}


async def test_a_refused_start_leaves_nothing(tmp_path: Path, image: Path) -> None:
    """Nothing changed, and the bitmaps already there still usable: the daemon quits (a
    kill while the images are open for writing would mark them all in use)."""
    await anyio.run_process(["qemu-img", "bitmap", "--add", str(image), "old"])
    d = daemon(tmp_path)
    with pytest.raises(StorageDaemonError, match="'nope' not found"):
        await start(d, [Image("vda", image)], "c1", [Export("vda", "vda-t", "nope")])
    assert not await d.running()
    assert not any(p.exists() for p in (d.qmp, d.nbd, d.pidfile, d.log, d.marker))
    assert bitmaps(image) == {"old": ["auto"]}  # the transaction is all or nothing
    with pytest.raises(StorageDaemonError, match=r"missing\.qcow2"):
        await start(d, [Image("vda", tmp_path / "missing.qcow2")], "c1",
                    [Export("vda", "vda-t", None)])
    assert not any(p.exists() for p in (d.qmp, d.nbd, d.pidfile, d.log, d.marker))


async def test_kill_9_while_it_serves_leaves_the_bitmaps_usable(
        tmp_path: Path, image: Path) -> None:
    """Once it serves, the images are read-only: a kill -9 marks no bitmap in use (a
    process killed with an image open read-write leaves every bitmap inconsistent)."""
    d = daemon(tmp_path)
    await start(d, [Image("vda", image)], "c1", [Export("vda", "vda-t", None)])
    pid = d.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await d.stop()  # reaps it, removes its files
    assert bitmaps(image) == {"c1": ["auto"]}
    # And the next backup since c1 works.
    await start(d, [Image("vda", image)], "c2", [Export("vda", "vda-t", "c1")])
    await d.stop()


async def test_nothing_writes_the_image_while_it_serves(tmp_path: Path, image: Path) -> None:
    d = daemon(tmp_path)
    await start(d, [Image("vda", image)], "c1", [Export("vda", "vda-t", None)])
    try:
        refused = await anyio.run_process(
            ["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(image)], check=False)
        assert refused.returncode != 0
        assert b'Failed to get "write" lock' in refused.stderr, refused.stderr
    finally:
        await d.stop()


async def test_a_raw_image_a_qemu_writes_already_is_refused(tmp_path: Path) -> None:
    """A raw image (no format node to lock it) is held off writers by a lock QEMU tests
    before it writes (`hold_writers_off`); one that writes already, a running domain sharing
    the disk, held it first: refused, not served as it changes. One nobody writes is held,
    and a writer is then kept off it."""
    await anyio.to_thread.run_sync(raw_writers_kept_off, tmp_path)


def raw_writers_kept_off(tmp_path: Path) -> None:
    raw = tmp_path / "shared.raw"
    raw.write_bytes(bytes(1 << 20))
    sock = tmp_path / "writer.sock"
    writer = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(raw)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(OSError, match="open for writing elsewhere"):
            hold_writers_off([Image("vdb", raw, "raw", bitmap=False)])
    finally:
        writer.terminate()
        writer.wait()
    held = hold_writers_off([Image("vdb", raw, "raw", bitmap=False)])
    try:
        refused = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", str(raw)],
                                 capture_output=True, check=False)
        assert b'Failed to get "write" lock' in refused.stderr, refused.stderr
    finally:
        for fd in held:
            os.close(fd)


async def test_a_push_writes_the_file_it_made_whatever_its_name_leads_to_since(
        tmp_path: Path, image: Path) -> None:
    """A push's folder may be a user's: a link left at the target's name is refused, and
    a link put there once the file was made leads the push nowhere (the daemon opened the
    target by its name, and would have written the backup into any image the link named)."""
    victim = tmp_path / "another domain's disk.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(victim), str(SIZE)])
    before = victim.read_bytes()
    folder = tmp_path / "user's folder"
    folder.mkdir()
    target = folder / "job.vda.qcow2"
    target.symlink_to(victim)
    with pytest.raises(FileExistsError):
        new_target(target, SIZE)
    target.unlink()
    fd = new_target(target, SIZE)
    target.rename(folder / "moved.qcow2")
    target.symlink_to(victim)
    d = daemon(tmp_path)
    try:
        await start(d, [Image("vda", image)], "c1", [], [Target("vda", target, None, fd)])
    finally:
        os.close(fd)
    try:
        with anyio.fail_after(30):
            while True:
                done = await anyio.to_thread.run_sync(pushed, d.qmp)
                if done[0]:
                    break
                await anyio.sleep(0.1)
        assert done == (True, None)
    finally:
        await d.stop()
    assert victim.read_bytes() == before
    compared = await anyio.run_process(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image),
         str(folder / "moved.qcow2")], check=False)
    assert compared.returncode == 0, compared.stdout


async def test_open_tells_each_images_bitmaps_and_layers(tmp_path: Path, image: Path) -> None:
    """What offline.py decides from (pullbackd opens no image itself: on a host they are
    root's): each image's persistent bitmaps, recording or not, one that a killed QEMU
    left in use inconsistent, and the layer under an overlay. It opens them read-only: a
    kill then leaves every bitmap usable."""
    await anyio.run_process(["qemu-img", "bitmap", "--add", str(image), "left"])
    # A QEMU killed with the image open for writing: "left" is in use now.
    await anyio.run_process(["qemu-io", "-f", "qcow2", "-c", "sigraise 9", str(image)],
                            check=False)
    await anyio.run_process(["qemu-img", "bitmap", "--add", str(image), "on"])
    d = daemon(tmp_path)
    await d.open("vm", [Image("vda", image)])
    pid = d.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await d.stop()
    assert bitmaps(image) == {"left": ["in-use", "auto"], "on": ["auto"]}  # as it was
    await anyio.run_process(["qemu-img", "bitmap", "--add", "--disable", str(image), "off"])
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                             "-F", "qcow2", str(overlay)])
    found = await d.open("vm", [Image("vda", image), Image("vdb", overlay, bitmap=False)])
    try:
        assert found == {
            "vda": Found(None, {"left": Bitmap(recording=False, inconsistent=True),
                                "on": Bitmap(recording=True, inconsistent=False),
                                "off": Bitmap(recording=False, inconsistent=False)}),
            "vdb": Found("vdb-1", {})}
    finally:
        await d.stop()
    assert bitmaps(image) == {"left": ["in-use", "auto"], "on": ["auto"], "off": []}
    assert not any(p.exists() for p in (d.qmp, d.nbd, d.pidfile, d.log, d.marker))


async def test_remove_bitmaps_takes_one_out_of_the_images_that_hold_it(
        tmp_path: Path, image: Path) -> None:
    other = tmp_path / "vdb.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(SIZE)])
    for path, name in ((image, "c1"), (image, "c2"), (other, "c2")):
        await anyio.run_process(["qemu-img", "bitmap", "--add", str(path), name])
    d = daemon(tmp_path)
    images = [Image("vda", image), Image("vdb", other)]
    found = await d.open("vm", images)
    try:
        await d.remove_bitmaps(images, found, "c1")  # vdb has none: not asked of it
        with pytest.raises(StorageDaemonError, match="nope"):
            await d.remove_bitmaps(images, found | {"vda": Found(None, {
                "nope": Bitmap(True, False)})}, "nope")
    finally:
        await d.stop()
    assert (bitmaps(image), bitmaps(other)) == ({"c2": ["auto"]}, {"c2": ["auto"]})
    # And serving a daemon opened so removes nothing more.
    found = await start(d, images, "c3", [Export("vda", "vda-t", "c2")])
    await d.stop()
    assert (bitmaps(image), bitmaps(other)) == ({"c2": ["auto"], "c3": ["auto"]},
                                                {"c2": ["auto"], "c3": ["auto"]})


@pytest.fixture
def hook(tmp_path: Path) -> Path:
    """The package's qemu hook, looking for markers in `tmp_path` (where `daemon` has them)."""
    path = tmp_path / "hook"
    path.write_text((Path(__file__).resolve().parent.parent / "libvirt-hooks" / "qemu.d" /
                     "pullbackd").read_text().replace("/run/pullbackd/exports/.qemu",
                                                      str(tmp_path)))
    return path


async def test_libvirts_hook_waits_for_a_removal_of_bitmaps_and_refuses_a_backup(
        tmp_path: Path, image: Path, hook: Path) -> None:
    """The package's qemu hook (libvirt-hooks/qemu.d/pullbackd) reads what `open` marks: a
    start of the domain while its images are open to take a deleted checkpoint's bitmaps
    out waits for that (refused, it named a job that does not exist, to be aborted), one
    while they are open for a backup is refused at once, and one of another domain goes."""

    def run(domain: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["sh", str(hook), domain, "prepare", "begin", "-"],
                                stderr=subprocess.PIPE, text=True)

    await anyio.run_process(["qemu-img", "bitmap", "--add", str(image), "c1"])
    d = daemon(tmp_path)
    images = [Image("vda", image)]
    found = await d.open("vm", images, removing="c1")
    try:
        assert run("other").wait(timeout=30) == 0
        start = run("vm")
        await anyio.sleep(1)
        assert start.poll() is None, start.communicate()
        await d.remove_bitmaps(images, found, "c1")
    finally:
        await d.stop()
    assert start.wait(timeout=30) == 0, start.communicate()
    assert bitmaps(image) == {}
    await d.open("vm", images)
    try:
        start = run("vm")
        assert start.wait(timeout=30) == 1
        assert "being backed up while shut off (job qsd)" in start.communicate()[1]
    finally:
        await d.stop()


async def test_libvirts_hook_holds_a_domain_while_its_daemon_comes_up(
        tmp_path: Path, hook: Path) -> None:
    """A marker without a PID file (`open` writes it before the daemon starts, and the
    daemon's PID comes once it runs): the daemon is coming up, and the hook refuses a start
    as under a backup, naming the job (on block devices no lock would refuse it), or for a
    removal of bitmaps waits for it. A marker older than the longest start is what a crash
    left: a start goes through."""

    def run(domain: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["sh", str(hook), domain, "prepare", "begin", "-"],
                                stderr=subprocess.PIPE, text=True)

    marker = tmp_path / "3f2a.domain"
    marker.write_text("vm")
    (tmp_path / "3f2a.pid").write_text("")  # qemu-storage-daemon writing it
    start = run("vm")
    assert start.wait(timeout=30) == 1
    assert "being backed up while shut off (job 3f2a)" in start.communicate()[1]
    (tmp_path / "3f2a.pid").unlink()
    start = run("vm")
    assert start.wait(timeout=30) == 1
    assert "(pullbackctl backup abort 3f2a)" in start.communicate()[1]
    assert run("other").wait(timeout=30) == 0
    await anyio.run_process(["touch", "-d", "10 minutes ago", str(marker)])
    start = run("vm")
    assert start.wait(timeout=30) == 0, start.communicate()
    marker.write_text("vm\nc1")
    await anyio.run_process(["touch", str(marker)])
    start = run("vm")
    await anyio.sleep(1)
    assert start.poll() is None, start.communicate()
    marker.unlink()
    assert start.wait(timeout=30) == 0, start.communicate()


async def test_an_image_a_crash_left_dirty_is_repaired_before_a_bitmap_goes_in(
        tmp_path: Path) -> None:
    """A qcow2 image with lazy refcounts whose QEMU was killed: its refcounts are stale
    until a QEMU opens it for writing. Opened read-only and made writable later, the new
    bitmap went over the guest's data; served, the disk is as the guest wrote it, and the
    image checks clean after."""
    image = tmp_path / "lazy.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                             "lazy_refcounts=on,compat=1.1", str(image), str(SIZE)])
    await anyio.run_process(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x07 0 8M", "-c",
                             "sigraise 9", str(image)], check=False)
    d = daemon(tmp_path)
    await start(d, [Image("vda", image)], "c1", [Export("vda", "vda-t", None)])
    try:
        data = await anyio.to_thread.run_sync(read_all, url(d, "vda-t"))
    finally:
        await d.stop()
    assert data == b"\x07" * (8 << 20) + bytes(SIZE - (8 << 20))
    checked = await anyio.run_process(["qemu-img", "check", str(image)], check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert bitmaps(image) == {"c1": ["auto"]}
