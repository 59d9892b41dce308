"""The persistent dirty bitmaps in a shut-off domain's qcow2 images, as the job's
qemu-storage-daemon finds them (qsd.py).

While a domain runs, QEMU owns its bitmaps and libvirt changes them for us. While it is
shut off, libvirt will not (it refuses to delete a checkpoint of an inactive domain), so
pullbackd reads and removes them in the image itself, as libvirt's own offline procedure
does (docs/kbase/internals/incremental-backup.rst). It does so through a
qemu-storage-daemon that holds the images, never by opening them itself: on a host a
shut-off domain's images are root's (libvirt gives them back when the domain stops), and
that daemon runs as root there (storage_unit.py) where pullbackd does not. While QEMU has
an image open for writing, the daemon cannot open it, and nothing changes.

A bitmap is named after its checkpoint. One left inconsistent (flagged in use by a QEMU
that did not close the image) may have missed writes: no backup may start from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bitmap:
    """A persistent bitmap of an image, as the daemon that opened the image has it."""

    #: It records every write (libvirt's checkpoints' bitmaps all do).
    recording: bool
    #: Left in use by a QEMU that did not close the image.
    inconsistent: bool


def usable(bitmap: Bitmap | None) -> bool:
    """Whether a bitmap (None: no such bitmap) can start a backup: it is there, it recorded
    every write, and no QEMU left it in use, as libvirt requires of a checkpoint's bitmap."""
    return bitmap is not None and bitmap.recording and not bitmap.inconsistent


def of(node: dict[str, Any]) -> dict[str, Bitmap]:
    """The persistent bitmaps of a node, by name, from QMP's `query-named-block-nodes`."""
    return {b["name"]: Bitmap(bool(b.get("recording")), bool(b.get("inconsistent")))
            for b in node.get("dirty-bitmaps", []) if b.get("persistent")}
