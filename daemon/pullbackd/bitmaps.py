"""The persistent dirty bitmaps in a shut-off domain's qcow2 images, through qemu-img.

While a domain runs, QEMU owns its bitmaps and libvirt changes them for us. While it is
shut off, libvirt will not (it refuses to delete a checkpoint of an inactive domain), so
pullbackd reads and removes them in the image itself, as libvirt's own offline procedure
does (docs/kbase/internals/incremental-backup.rst). qemu-img takes the image's lock: while
QEMU or a qemu-storage-daemon has the image open for writing, a removal fails and nothing
changes.

A bitmap is named after its checkpoint. One flagged `in-use` was left by a QEMU that did
not close the image: it is inconsistent, and no backup may start from it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio

from .errors import LibvirtError


async def of(image: Path) -> dict[str, tuple[str, ...]]:
    """The image's bitmaps and their flags ("auto": recording; "in-use": inconsistent).
    Raises LibvirtError if qemu-img cannot read the image."""
    info = json.loads(await _qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(image)))
    found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: tuple(b.get("flags", ())) for b in found}


def usable(flags: tuple[str, ...] | None) -> bool:
    """Whether a bitmap with these flags (None: no such bitmap) can start a backup: it is
    there, it recorded every write ("auto"), and no QEMU left it open ("in-use"), as
    libvirt requires of a checkpoint's bitmap."""
    return flags is not None and "auto" in flags and "in-use" not in flags


def chain_info(image: Path) -> tuple[str, ...]:
    """qemu-img's arguments for what `layers` reads."""
    return ("info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", str(image))


def layers(info: str) -> tuple[tuple[Path, str], ...]:
    """The layers under an image (an external snapshot's overlay), each file with its
    format, from its backing file down, from qemu-img's `chain_info`; none for an image
    that stands alone."""
    return tuple((Path(layer["filename"]), layer["format"]) for layer in json.loads(info)[1:])


async def backing(image: Path) -> tuple[tuple[Path, str], ...]:
    """`layers` of the image. Raises LibvirtError."""
    return layers(await _qemu_img(*chain_info(image)))


async def remove(image: Path, name: str) -> None:
    """Remove the bitmap `name` from the image; one that is not there is removed already.
    Raises LibvirtError if the image cannot be changed now (in use, say)."""
    if name in await of(image):
        await _qemu_img("bitmap", "--remove", "-f", "qcow2", str(image), name)


async def _qemu_img(*args: str) -> str:
    try:
        proc = await anyio.run_process(["qemu-img", *args], check=False,
                                       stdin=subprocess.DEVNULL)
    except OSError as e:
        raise LibvirtError(-1, f"qemu-img: {e}") from None
    if proc.returncode != 0:
        raise LibvirtError(-1, f"qemu-img {args[0]}: "
                               f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()
