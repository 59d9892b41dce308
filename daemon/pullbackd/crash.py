"""Crash points: where a test can make the daemon die as a `kill -9` would.

    PULLBACKD_CRASH_AT=end.recorded pullbackd ...

makes the daemon call `os._exit` the first time it reaches that point: no
cleanup, no `finally`, no flush, exactly what a power cut or a SIGKILL leaves.
Each point sits right after a step that persists something (the database, a
file, libvirt's state), so a test per point proves that the next start finds a
state it can recover from, and that recovery reaches the outcome the invariants
promise (chain.py, repository.py).

Without the variable (any real deployment) `point` only compares two strings.
"""

from __future__ import annotations

import os
import sys

ENV = "PULLBACKD_CRASH_AT"
#: The exit status of a crash at a point (as a shell reports a SIGKILL).
STATUS = 137

#: Every point, in the order a backup meets them.
POINTS = (
    "start.recorded",      # the job and its pending checkpoint are in the database
    "start.frozen",        # the guest agent froze the guest's filesystems (quiesce)
    "start.served",        # a shut-off domain's qemu-storage-daemon serves, no checkpoint yet
    "start.begun",         # libvirt runs the backup and created the checkpoint
    "start.ready",         # the job is recorded ready (or running)
    "end.sessions",        # a job that ends: its appliances' sessions are closed
    "end.libvirt",         # libvirt ended the backup job
    "end.cleaned",         # files of a job that did not complete are removed
    "end.recorded",        # the job's end and its checkpoint's fate are recorded
    "checkpoint.deleted",  # libvirt deleted a checkpoint, the database still lists it
    "commit.files",        # a streamed job's domain files are stored, no disk committed yet
    "commit.renamed",      # a streamed backup file has its final name, no manifest yet
    "commit.stored",       # every file and manifest of a streamed job is written
    "chain.deleting",      # DeleteChain took one checkpoint out of the chain
    "chain.trimmed",       # an old checkpoint left a chain over [chains] keep
    "prune.flattened",     # Prune replaced a kept backup by a standalone file
    "prune.manifest",      # ... and rewrote its manifest
    "prune.unlinked",      # ... and removed the newest dropped backup's manifest
    "prune.dropping",      # ... and removed the dropped backups' manifests
)

_AT = os.environ.get(ENV, "")


def point(name: str) -> None:
    """Die here if the environment says so."""
    if name == _AT:
        print(f"pullbackd: crash point {name}: exiting at once", file=sys.stderr, flush=True)
        os._exit(STATUS)
