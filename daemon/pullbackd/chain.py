"""Checkpoint chains: one per domain and backup consumer, owned by pullbackd.

Every backup creates a libvirt checkpoint named `pullbackd.<consumer>.<job-id>`
(a bitmap per disk, recording from that instant on). Only a backup the
appliance confirmed makes its checkpoint part of the consumer's chain; any
other outcome deletes it. An incremental backup of a disk reads the bitmap of
the newest checkpoint in the chain that has one on that disk.

Why this can never miss data: libvirt keeps each checkpoint's bitmap on its
own, recording every write from its creation on, whatever other checkpoints
come and go (libvirt's docs/kbase/internals/incremental-backup.rst). So the
newest confirmed checkpoint covers every write since the last backup the
appliance holds, and deleting any other checkpoint cannot narrow it. Several
consumers' chains interleave on one domain without affecting each other.

pullbackd's own state is the truth about chains; libvirt's metadata is
rebuilt from it (redefined) when libvirt lost it. A disk whose bitmap is gone
or inconsistent is backed up in full, and its chain restarts there.

The invariant, which holds after a crash at any instant:

    a checkpoint is in its consumer's chain (complete) if and only if
    its job is recorded as completed.

A job's end and its checkpoint's new state are written in one transaction
(`outcome`, then `Store.save_job`, then `settle`): complete with a completed
job; otherwise marked for deletion, and deleted from libvirt after the
transaction (at the next start, or the domain's next backup, if libvirt cannot
now). Recovery checks the invariant at every start; a checkpoint in a chain
whose job did not complete is a bug, logged as an error and rolled back. A
checkpoint rolled back, or deleted with its chain, is also taken out of the
domain's metadata, so that no pullbackd takes it in again; until libvirt lets
that be written, its record stays, marked for deletion.

A chain is one user's: the one who started the backup of its newest checkpoint that
records who did (`owner`; a checkpoint of an earlier version, or rebuilt from libvirt's
metadata, records nobody). Its owner alone may start a backup of its consumer on its
domain (starting.py; ChainOfAnother): anyone else's would join it, and the owner's next
incremental would start from a backup the owner never read, and miss what changed
before it. So every checkpoint of a chain that records an owner records the same one;
recovery logs one that does not as a bug.

The domain's metadata follows its chains: it is rewritten after every change of
them (`_mirror`), and at every start for each domain whose metadata differs from
them (a crash came between a job's end and the rewrite, or libvirt refused the
write; `check`). So what a migration carries, or a new database takes in, lacks
a completed checkpoint only from its job's end until the rewrite, which comes at
the latest at the next start that libvirt lets write it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from dataclasses import replace as _replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import structlog

from . import crash, xml
from .errors import DomainBusy, InvalidParameter, LibvirtError, NoSuchCheckpoint, NoSuchDomain
from .model import Checkpoint, CheckpointState, timestamp
from .names import CONSUMER, DEFAULT_CONSUMER, PREFIX, checkpoint_name
from .virt import BrokenBitmap, Domain, ShutOff, Virt

if TYPE_CHECKING:
    from .state import Store

# CONSUMER, DEFAULT_CONSUMER, PREFIX and checkpoint_name are named in names.py, and
# re-exported for the modules that take them from here.
__all__ = ["CONSUMER", "DEFAULT_CONSUMER", "PREFIX", "Base", "Chains", "Checkpoint",
           "CheckpointState", "check_consumer", "checkpoint_name"]

log = structlog.get_logger()


def check_consumer(consumer: str) -> str:
    if not CONSUMER.fullmatch(consumer):
        raise InvalidParameter("consumer", "must match [a-z0-9_-]{1,32}")
    return consumer


#: Takes the bitmaps of a checkpoint (its name, the last argument) out of the images of
#: a shut-off domain's disks: (domain, disks, checkpoint).
Forget = Callable[[str, list[str], str], Awaitable[None]]


@dataclass(frozen=True)
class Base:
    """Where one disk's backup starts: a checkpoint, or None for a full backup (and why)."""

    checkpoint: str | None
    fallback: str | None = None
    #: Whether the disk gets a bitmap in the new checkpoint (only qcow2 images can).
    bitmap: bool = True


class Chains:
    def __init__(self, virt: Virt, store: Store, forget: Forget, keep: int = 0) -> None:
        """`forget`: takes a checkpoint's bitmaps out of a shut-off domain's images
        (OfflineSource.forget); `keep`: checkpoints of each consumer's chain kept per disk
        (see `_over_keep`); 0 keeps them all."""
        self._virt = virt
        self._store = store
        self._forget = forget
        self.keep = keep
        self._checkpoints: dict[str, Checkpoint] = {c.name: c for c in store.load_checkpoints()}
        #: domain -> held while its chains are written into its metadata.
        self._mirroring: defaultdict[str, anyio.Lock] = defaultdict(anyio.Lock)

    def of(self, domain: str, consumer: str | None = None) -> list[Checkpoint]:
        """The confirmed checkpoints of a domain (one consumer's, or all), oldest first."""
        return sorted((c for c in self._checkpoints.values()
                       if c.domain == domain and c.state == CheckpointState.COMPLETE
                       and (consumer is None or c.consumer == consumer)),
                      key=lambda c: c.created)

    def owner(self, domain: str, consumer: str) -> int | None:
        """The uid whose the consumer's chain on `domain` is (see above); None: anyone's."""
        return next((c.owner for c in reversed(self.of(domain, consumer))
                     if c.owner is not None), None)

    def after_newest(self, domain: str, consumer: str, created: str) -> str:
        """`created`, or just after the newest checkpoint of the consumer's chain if that
        is not older: a checkpoint rebuilt from libvirt carries libvirt's time, in whole
        seconds, but its backup began after every checkpoint of its chain was confirmed,
        and the chain's order (creation order) must say so."""
        chain = self.of(domain, consumer)
        if not chain or chain[-1].created < created:
            return created
        return timestamp(datetime.fromisoformat(chain[-1].created) + timedelta(milliseconds=1))

    def get(self, name: str) -> Checkpoint | None:
        return self._checkpoints.get(name)

    def pending(self) -> list[Checkpoint]:
        return [c for c in self._checkpoints.values() if c.state == CheckpointState.PENDING]

    def all(self) -> list[Checkpoint]:
        """Every checkpoint pullbackd knows, in any state, oldest first."""
        return sorted(self._checkpoints.values(), key=lambda c: c.created)

    def bases(self, domain: str, consumer: str, mode: str, since: str | None,
              disks: list[str], lost: Mapping[str, str] | None = None) -> dict[str, Base]:
        """Per disk, the checkpoint its backup starts from; never one of `lost` (from
        `prepare`): an incremental starts from an older one then, whose bitmap holds
        every change since the newer one too."""
        if mode == "full":
            return {d: Base(None) for d in disks}
        lost = lost or {}
        chain = self.of(domain, consumer)
        if mode == "differential":
            if since is None or since not in {c.name for c in chain}:
                raise NoSuchCheckpoint(domain, consumer, since or "")
            start = self._checkpoints[since]
            return {d: Base(None, _unusable(since, lost[since])) if since in lost
                    else Base(since) if d in start.disks
                    else Base(None, f"checkpoint {since} has no bitmap for this disk")
                    for d in disks}
        bases = {}
        for disk in disks:
            having = [c.name for c in reversed(chain) if disk in c.disks]
            head = next((name for name in having if name not in lost), None)
            bases[disk] = Base(head) if head else Base(None, _unusable(
                having[0], lost[having[0]]) if having else
                f"consumer {consumer} has no earlier backup of this disk")
        return bases

    async def prepare(self, domain: str, refused: Callable[[str], bool]) -> dict[str, str]:
        """Before a backup: delete what failed backups left, and make sure libvirt
        knows every checkpoint of ours it may be asked to start from. `refused`
        tells the jobs known not to have completed: their checkpoints are never
        taken in from the domain's metadata. Returns the checkpoints libvirt lost and
        refuses to take back (a disk they cover was detached since), with libvirt's
        reason: no backup may start from them (see `bases`)."""
        if discarded := [c for c in self.all() if c.domain == domain
                         and c.state == CheckpointState.DISCARD]:
            await self._purge(domain, discarded)
        await self.take_in(domain, refused)
        lost: dict[str, str] = {}
        ours = self.of(domain)
        if not ours:
            return lost
        known = set(await self._virt.checkpoints(domain))
        dom: Domain | None = None
        for c in ours:  # oldest first: a parent is redefined before its children
            if c.name in known or c.xml is None:
                continue
            dom = dom or await self._virt.domain(domain)
            if (was := xml.checkpoint_domain_uuid(c.xml)) not in (None, xml.uuid_of(dom.xml)):
                # A former domain of this name (undefined, and another defined since):
                # its chain is not this domain's, and its bitmaps are in no disk of it.
                log.warning("forgetting the chain of a former domain of this name",
                            domain=domain, checkpoint=c.name, uuid=was)
                await self._store.delete_checkpoint(c.name)
                self._checkpoints.pop(c.name, None)
                continue
            # libvirt validates bitmaps in a running domain only (offline.py checks each
            # in the image itself before it starts from one).
            validate = dom.running
            text = c.xml
            if (parent := xml.parse_checkpoint(text).parent) and parent not in known:
                text = xml.without_parent(text)
            try:
                try:
                    await self._virt.redefine_checkpoint(domain, text, validate=validate)
                except BrokenBitmap as e:
                    # Define it all the same: the backup itself checks each disk's
                    # bitmap and falls back to full for the broken ones alone.
                    log.warning("redefining a checkpoint with a broken bitmap",
                                checkpoint=c.name, error=str(e))
                    await self._virt.redefine_checkpoint(domain, text, validate=False)
            except LibvirtError as e:
                # One checkpoint libvirt will not take back must not stop every backup
                # of the domain: backups start elsewhere (`bases`).
                log.warning("cannot redefine lost checkpoint metadata; no backup starts "
                            "from it", domain=domain, checkpoint=c.name, error=str(e))
                lost[c.name] = str(e)
                continue
            log.info("redefined lost checkpoint metadata", domain=domain, checkpoint=c.name)
            known.add(c.name)
        return lost

    async def take_in(self, domain: str, refused: Callable[[str], bool]) -> None:
        """Take in the chains the domain's metadata carries that we do not know: it was
        backed up by a pullbackd elsewhere (and migrated here), or our database is new."""
        if (entries := await self._listed(domain)) is not None:
            await self._take_in(domain, entries, refused)

    async def _listed(self, domain: str) -> list[xml.ChainEntry] | None:
        """The chains the domain's metadata carries; None if it cannot be read (logged)."""
        try:
            text = await self._virt.metadata(domain, xml.CHAINS_NS)
            return xml.parse_chains(text) if text else []
        except (LibvirtError, NoSuchDomain, DomainBusy, xml.XMLError) as error:
            log.warning("cannot read the chains in the domain's metadata", domain=domain,
                        error=str(error))
            return None

    async def _take_in(self, domain: str, entries: list[xml.ChainEntry],
                       refused: Callable[[str], bool]) -> None:
        for entry in entries:
            ours = CONSUMER.fullmatch(entry.consumer) and \
                entry.name.startswith(f"pullbackd.{entry.consumer}.")
            if ours and refused(entry.job):
                log.warning("not taking in a checkpoint whose backup did not complete",
                            domain=domain, checkpoint=entry.name)
            elif ours and entry.name not in self._checkpoints:
                await self._save(Checkpoint(entry.name, domain, entry.consumer, entry.job,
                                            entry.created, CheckpointState.COMPLETE,
                                            entry.disks, entry.xml, entry.full))
                log.info("took in a checkpoint from the domain's metadata", domain=domain,
                         checkpoint=entry.name, consumer=entry.consumer)

    async def _mirror(self, domain: str) -> bool:
        """Write the domain's confirmed chains into its own metadata, so that they travel
        with it (a migration) and any pullbackd can take them in; whether it was written.
        Failing to add a checkpoint only costs a full backup after a move: it is logged,
        not raised (for one taken out, see `_delete`)."""
        async with self._mirroring[domain]:
            entries = self._entries(domain)
            try:
                await self._virt.set_metadata(domain, xml.chains(entries) if entries else None,
                                              "pullbackd", xml.CHAINS_NS)
            except (LibvirtError, NoSuchDomain, DomainBusy) as e:
                log.warning("cannot write the chains into the domain's metadata",
                            domain=domain, error=str(e))
                return False
            return True

    def _entries(self, domain: str) -> list[xml.ChainEntry]:
        """The domain's confirmed chains as its metadata carries them (`_mirror`)."""
        return [xml.ChainEntry(c.name, c.consumer, c.job, c.created, c.disks,
                               None if c.xml is None else xml.without_domain(c.xml), c.full)
                for c in self.of(domain)]

    async def _mend_metadata(self, domain: str, refused: Callable[[str], bool]) -> None:
        """At start: rewrite the domain's metadata if it does not carry the domain's chains
        (a crash came between a job's end and `_trim`), after taking in what it carries
        that we do not know (`take_in`: a rewrite must not drop it). A domain whose
        metadata carries them costs a read, and no write."""
        if (listed := await self._listed(domain)) is None:
            return
        await self._take_in(domain, listed, refused)
        if xml.same_chains(listed, self._entries(domain)):
            return
        log.warning("the domain's metadata does not carry its chains as recorded (a crash, "
                    "or libvirt refusing the write, came after they changed): rewriting it",
                    domain=domain)
        await self._mirror(domain)

    def recorded(self, checkpoint: Checkpoint) -> None:
        """A checkpoint its job stored in the job's own transaction (`Store.save_job`
        with it): the chains follow the database from here on."""
        self._checkpoints[checkpoint.name] = checkpoint

    async def begun(self, name: str, full: tuple[str, ...]) -> Checkpoint:
        """libvirt created the checkpoint with its backup: the checkpoint with libvirt's
        XML of it, to redefine it if libvirt loses it, and which disks are backed up in
        full; for the job to store as it becomes ready (then `recorded`)."""
        c = self._checkpoints[name]
        # A backup of disks none of which holds a bitmap has no checkpoint in libvirt
        # (only qcow2 images hold bitmaps): nothing to keep, and nothing to start from.
        text = await self._virt.checkpoint_xml(c.domain, name) if c.disks else None
        return _replace(c, xml=text, full=full)

    def outcome(self, name: str, completed: bool) -> Checkpoint | None:
        """The checkpoint of a job that ends, as it is to be recorded in the same
        transaction as the job's end: in the chain if the job completed, else
        marked for deletion. None if the job has no checkpoint (yet)."""
        c = self._checkpoints.get(name)
        if c is None:
            return None
        return _replace(c, state=CheckpointState.COMPLETE if completed
                        else CheckpointState.DISCARD)

    async def settle(self, c: Checkpoint) -> None:
        """After the transaction that recorded `c` (from `outcome`): the chain
        follows it here, and libvirt and the domain's metadata after it."""
        before = self._checkpoints.get(c.name)
        self._checkpoints[c.name] = c
        if c.state == CheckpointState.COMPLETE:
            await self._trim(c.domain, c.consumer)
        else:
            await self.discard(c, mirrored=before is not None
                               and before.state == CheckpointState.COMPLETE)

    async def discard(self, c: Checkpoint, *, mirrored: bool | None = None) -> None:
        """Delete a checkpoint whose backup was not confirmed. If libvirt cannot
        now, remember to try again: it is never used as a base meanwhile.
        `mirrored`: whether the domain's metadata may list it (default: if it was
        in a chain, or may have been: one found marked for deletion, by a deletion a
        crash cut short before the metadata was rewritten); then the metadata is
        rewritten without it, or a start would take it in again from there."""
        if mirrored is None:
            mirrored = c.state != CheckpointState.PENDING
        if c.state != CheckpointState.DISCARD:
            # Out of the chain before anything else: never a base from here on.
            c = _replace(c, state=CheckpointState.DISCARD)
            await self._save(c)
        if mirrored:
            await self._purge(c.domain, [c])
        else:
            await self._delete(c, listed=False)

    async def _purge(self, domain: str, doomed: list[Checkpoint]) -> None:
        """Delete checkpoints marked for deletion that the domain's metadata may list:
        it is rewritten without them first."""
        unlisted = await self._unlisted(domain, doomed)
        for c in doomed:
            await self._delete(c, listed=c.name not in unlisted)

    async def _unlisted(self, domain: str, doomed: list[Checkpoint]) -> set[str]:
        """Which of `doomed` the domain's metadata does not list: all of them once it is
        rewritten (once for all: each try may wait 30 s for libvirt); if it cannot be,
        those it does not list anyway (none, if it cannot be read either)."""
        names = {c.name for c in doomed}
        if await self._mirror(domain):
            return names
        try:
            text = await self._virt.metadata(domain, xml.CHAINS_NS)
            listed = {entry.name for entry in xml.parse_chains(text)} if text else set()
        except (LibvirtError, NoSuchDomain, DomainBusy, xml.XMLError):
            return set()
        return names - listed

    async def _delete(self, c: Checkpoint, *, listed: bool) -> None:
        """Delete a checkpoint marked for deletion from libvirt, then its record, unless
        the domain's metadata may still list it (`listed`: it could not be rewritten).
        Then the record stays, marked for deletion, until the metadata is rewritten (the
        domain's next backup or the next start tries again): without it, the next
        `take_in` would find the checkpoint in the metadata, take it for a chain we do
        not know, and bring a deleted chain back."""
        try:
            try:
                await self._virt.delete_checkpoint(c.domain, c.name)
            except ShutOff:
                await self._delete_offline(c)
        except Exception as e:
            log.warning("cannot delete checkpoint yet; will retry", checkpoint=c.name,
                        error=str(e))
            return
        crash.point("checkpoint.deleted")
        if listed:
            log.warning("deleted checkpoint; the domain's metadata still lists it: will "
                        "rewrite it", domain=c.domain, checkpoint=c.name)
            return
        await self._store.delete_checkpoint(c.name)
        self._checkpoints.pop(c.name, None)
        log.info("deleted checkpoint", domain=c.domain, checkpoint=c.name)

    async def _delete_offline(self, c: Checkpoint) -> None:
        """libvirt deletes no bitmap of a shut-off domain: they go out of its images
        first, then libvirt's metadata of the checkpoint (after a crash between the two,
        the next delete finds the bitmaps gone and deletes the metadata alone)."""
        await self._forget(c.domain, list(c.disks), c.name)
        await self._virt.delete_checkpoint(c.domain, c.name, metadata_only=True)

    async def check(self, did_not_complete: Callable[[str], bool], running: set[str]) -> None:
        """At start: the invariant. A checkpoint in a chain whose job `did_not_complete`
        is a bug: logged, and rolled back. Also delete what an earlier run could not
        (or crashed before it did): discarded checkpoints, and pending ones whose job
        is not `running`; and rewrite the metadata of every other domain we know whose
        metadata does not carry its chains (`_mend_metadata`)."""
        doomed: defaultdict[str, list[Checkpoint]] = defaultdict(list)
        for found in self.all():
            if found.state == CheckpointState.COMPLETE and did_not_complete(found.job):
                log.error("BUG: a checkpoint is in its consumer's chain but its backup did "
                          "not complete; rolling it back (the next incremental covers its "
                          "changes)", checkpoint=found.name, job=found.job)
            elif not (found.state == CheckpointState.DISCARD or (
                    found.state == CheckpointState.PENDING and found.job not in running)):
                continue
            c = _replace(found, state=CheckpointState.DISCARD)
            if found.state != CheckpointState.DISCARD:
                await self._save(c)  # out of the chain before anything else
            doomed[c.domain].append(c)
        for domain, checkpoints in doomed.items():
            await self._purge(domain, checkpoints)  # rewrites the domain's metadata first
        self._check_owners()
        for domain in sorted({c.domain for c in self.all()} - doomed.keys()):
            await self._mend_metadata(domain, did_not_complete)

    def _check_owners(self) -> None:
        """Every checkpoint of a chain that records an owner records the same one."""
        owners: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
        for c in self.all():
            if c.state == CheckpointState.COMPLETE and c.owner is not None:
                owners[c.domain, c.consumer].add(c.owner)
        for (domain, consumer), uids in owners.items():
            if len(uids) > 1:
                log.error("BUG: a chain has checkpoints of several users; its newest one's "
                          "owns it", domain=domain, consumer=consumer, uids=sorted(uids))

    def _over_keep(self, domain: str, consumer: str) -> list[Checkpoint]:
        """The checkpoints of a consumer's chain it no longer needs: each bitmap costs
        QEMU work on every guest write. A checkpoint stays while, for one of its
        disks, it is among the newest `keep` with that disk (incrementals start at
        the newest), or it is the newest where that disk was backed up in full
        (differentials start there)."""
        if not self.keep:
            return []
        chain = self.of(domain, consumer)
        needed: set[str] = set()
        for disk in {d for c in chain for d in c.disks}:
            having = [c for c in chain if disk in c.disks]
            needed.update(c.name for c in having[-self.keep:])
            needed.update(c.name for c in [c for c in having if disk in c.full][-1:])
        return [c for c in chain if c.name not in needed]

    async def _trim(self, domain: str, consumer: str) -> None:
        """A checkpoint joined the chain: write the chains into the domain's metadata,
        and delete what the chain no longer needs."""
        doomed = self._over_keep(domain, consumer)
        await self._drop(domain, doomed, "chain.trimmed")
        if doomed:
            log.info("trimmed a chain to [chains] keep", domain=domain, consumer=consumer,
                     deleted=[c.name for c in doomed])

    async def delete_chain(self, domain: str, consumer: str) -> list[str]:
        """Delete a consumer's checkpoints; other consumers' chains are untouched."""
        doomed = [c for c in self.all() if c.domain == domain and c.consumer == consumer]
        await self._drop(domain, doomed, "chain.deleting")
        deleted = [c.name for c in doomed]
        log.info("deleted chain", domain=domain, consumer=consumer, checkpoints=deleted)
        return deleted

    async def _drop(self, domain: str, doomed: list[Checkpoint], point: str) -> None:
        """Take checkpoints out of the domain's chains: recorded first (never a base
        from then on), the domain's metadata rewritten (with or without them), then
        libvirt deletes them, oldest first; one libvirt cannot delete now is deleted
        at the domain's next backup or the next start."""
        for c in doomed:
            if c.state != CheckpointState.DISCARD:
                await self._save(_replace(c, state=CheckpointState.DISCARD))
            crash.point(point)
        await self._purge(domain, [self._checkpoints[c.name] for c in doomed])

    async def _save(self, c: Checkpoint) -> None:
        await self._store.save_checkpoint(c)
        self._checkpoints[c.name] = c



def _unusable(checkpoint: str, why: str) -> str:
    return f"libvirt lost checkpoint {checkpoint} and refuses to take it back ({why})"
