"""The fakes of the fast tests of the job state machine (test_jobs.py).

`FakeSource` is the one fake at the backup-source interface (`source.BackupSource`):
jobs.py drives every source through it, so the state machine is tested here
without libvirt, QEMU or NBD. `FakeVirt` is the little of the libvirt adapter
that chain.py and migration.py use beside the source (checkpoints, the domain's
metadata, a domain's state, migrate). test_faults.py fakes one level lower,
libvirt itself under the real `LibvirtSource`.

As vdsm's backup tests do, a fake fails on demand: `errors[method] = exception`
makes that method raise until the entry is removed, before it changes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import anyio

from pullbackd import xml
from pullbackd.chain import Base
from pullbackd.domainfiles import DEFINITION, NVRAM, DomainFiles
from pullbackd.errors import (
    BackupInProgress,
    DomainNotRunning,
    LibvirtError,
    NoSuchDisk,
    NoSuchDomain,
)
from pullbackd.model import Job, Kind, Scratch, now
from pullbackd.names import CONSUMER, PREFIX, job_file
from pullbackd.source import Begun, Exported, Plan, Sink, Unowned
from pullbackd.virt import AgentError, Definition, Domain, ShutOff, Virt

#: Every domain's disks and their size in bytes (small: the scratch check is real).
DISKS = {"vda": 1 << 20, "vdb": 2 << 20}


class FakeVirt(Virt):
    """libvirt as chain.py and migration.py see it: each domain's checkpoints (libvirt's
    XML of each), its metadata, whether it runs, and migrations (recorded, not done);
    and the domains a restore defines (`defined`).
    Like libvirt, it cannot delete a checkpoint of a domain that does not run; the
    bitmaps of one, chain.py has the offline source take out (`forget_bitmaps`)."""

    def __init__(self, domains: tuple[str, ...] = ("d1", "d2", "d3", "d4", "d5")) -> None:
        super().__init__("test:///fake")
        self.running = dict.fromkeys(domains, True)
        self.checkpoint_xmls: dict[tuple[str, str], str] = {}
        self.metadata_xmls: dict[str, str] = {}
        #: (domain, destination) of every migration asked for.
        self.migrated: list[tuple[str, str]] = []
        #: What `forget_bitmaps` was asked: (domain, disks, checkpoint).
        self.forgotten: list[tuple[str, list[str], str]] = []
        #: Domains `define` defined (a restore's): name -> definition.
        self.defined: dict[str, str] = {}
        self.errors: dict[str, Exception] = {}

    def _fail(self, method: str) -> None:
        if method in self.errors:
            raise self.errors[method]

    async def definition(self, name: str) -> Definition:
        self._fail("definition")
        if name not in self.running:
            raise NoSuchDomain(name)
        xml = f"<domain><name>{name}</name></domain>"
        return Definition(xml, xml if self.running[name] else None)

    async def exists(self, name: str) -> bool:
        self._fail("exists")
        return name in self.running or name in self.defined

    async def define(self, xml: str) -> None:
        self._fail("define")
        self.defined[str(ElementTree.fromstring(xml).findtext("name"))] = xml

    async def domain(self, name: str, definition: bool = False) -> Domain:
        self._fail("domain")
        if name not in self.running:
            raise NoSuchDomain(name)
        return Domain(name, self.running[name], "<domain/>", None,
                      f"<domain><name>{name}</name></domain>" if definition else None)

    async def checkpoints(self, domain: str) -> list[str]:
        self._fail("checkpoints")
        return [name for (d, name) in self.checkpoint_xmls if d == domain]

    async def checkpoint_xml(self, domain: str, name: str) -> str:
        self._fail("checkpoint_xml")
        return self.checkpoint_xmls[domain, name]

    async def redefine_checkpoint(self, domain: str, checkpoint_xml: str,
                                  validate: bool) -> None:
        self._fail("redefine_checkpoint")
        name = xml.parse_checkpoint(checkpoint_xml).name
        self.checkpoint_xmls[domain, name] = checkpoint_xml

    async def delete_checkpoint(self, domain: str, name: str, *,
                                metadata_only: bool = False) -> None:
        self._fail("delete_checkpoint")
        if not metadata_only and not self.running.get(domain, False):
            raise ShutOff(domain)  # the bitmaps are in images, which a fake domain has not
        self.checkpoint_xmls.pop((domain, name), None)

    async def metadata(self, domain: str, namespace: str) -> str | None:
        self._fail("metadata")
        return self.metadata_xmls.get(domain)

    async def set_metadata(self, domain: str, element: str | None, prefix: str,
                           namespace: str) -> None:
        self._fail("set_metadata")
        if element is None:
            self.metadata_xmls.pop(domain, None)
        else:
            self.metadata_xmls[domain] = element

    async def migrate(self, domain: str, destination: str, *, live: bool, copy_storage: bool,
                      unsafe: bool) -> None:
        self._fail("migrate")
        self.migrated.append((domain, destination))
        self.running.pop(domain)

    async def forget_bitmaps(self, domain: str, disks: list[str], checkpoint: str) -> None:
        """What OfflineSource.forget is to chain.py (a fake domain's disks are no images:
        there is nothing to take the bitmaps out of)."""
        self._fail("forget_bitmaps")
        self.forgotten.append((domain, disks, checkpoint))


@dataclass
class Stall:
    """Holds every call of a method until released (`FakeSource.stall`)."""

    #: Set once a call waits here.
    reached: anyio.Event = field(default_factory=anyio.Event)
    released: anyio.Event = field(default_factory=anyio.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class Backup:
    """A backup the fake source runs (one per domain at most)."""

    job: str
    checkpoint: str
    begun: Begun


@dataclass
class FakeSource:
    """The one fake at the backup-source interface (`source.BackupSource`).

    What it models, as `LibvirtSource` does for libvirt:
    - domains (`virt.running`), each with the disks of `sizes` (default `DISKS`);
    - one backup per domain at most (`backups`): `begin` starts it and creates the
      job's checkpoint in `virt` (as libvirt does with the backup), `end` ends it;
      a push writes its target files, empty, where libvirt would;
    - a checkpoint whose disk's bitmap is in `broken` cannot be a base: that disk
      is backed up in full, and `begin` says why in `bases`;
    - after a loss of the state database, `unowned` finds the pull backups it runs
      and tells the consumer from the checkpoint named after the job.

    It serves nothing: a pull or stream backup's exports are names on `socket(job)`,
    where nothing listens. A pull job's endpoint (serving.py) relays to it only once
    an appliance connects, and pullbackd's own copy of a stream job fails at once.

    Tests steer it with:
    - `errors[method] = exception`: that method raises (before changing anything),
      until the entry is removed (the async methods, and `sweep`);
    - `stall(method)`: that method waits until the stall is released;
    - `ended`, `stopped`, `lose`: what libvirt's events tell, through `follow`'s sink;
    - `causes[domain]`: what `cause` answers, after a copy failed;
    - `unreachable`: domains whose exports nothing reaches (their socket went);
    - `agents`: domains whose guest agent is connected (`freeze` and `thaw` of another
      raise AgentError, as libvirt does); `frozen`, those frozen now;
    - `nvram`: domains' NVRAM contents (`files`).
    `calls` records every call as (method, domain).
    """

    virt: FakeVirt
    #: Where its exports would be served.
    dir: Path
    backups: dict[str, Backup] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    causes: dict[str, str] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)
    frozen: set[str] = field(default_factory=set)
    nvram: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)
    stalls: dict[str, Stall] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    #: The `running` argument of each `sweep`.
    swept: list[set[str]] = field(default_factory=list)
    #: What each domain's disks measure (`plan`).
    sizes: dict[str, int] = field(default_factory=lambda: dict(DISKS))
    _sink: Sink | None = field(default=None, init=False)
    _lost: anyio.Event | None = field(default=None, init=False)
    _lost_reason: str = field(default="", init=False)

    async def _enter(self, method: str, domain: str) -> None:
        self.calls.append((method, domain))
        if (stall := self.stalls.get(method)) is not None:
            stall.reached.set()
            await stall.released.wait()
        if method in self.errors:
            raise self.errors[method]

    def stall(self, method: str) -> Stall:
        """Make every call of `method` wait, from now until the stall is released."""
        stall = self.stalls[method] = Stall()
        return stall

    def release(self) -> None:
        """Release every stall: a call held in a shielded scope of jobs.py would
        otherwise hold up the end of a test that failed."""
        for stall in self.stalls.values():
            stall.release()

    def called(self, method: str) -> list[str]:
        """The domains `method` was called for, in order."""
        return [domain for m, domain in self.calls if m == method]

    # BackupSource.

    async def plan(self, domain: str, wanted: list[str] | None, kind: Kind) -> Plan:
        await self._enter("plan", domain)
        if domain not in self.virt.running:
            raise NoSuchDomain(domain)
        if not self.virt.running[domain]:
            raise DomainNotRunning(domain)
        if domain in self.backups:
            raise BackupInProgress(domain, "")
        for disk in wanted or ():
            if disk not in self.sizes:
                raise NoSuchDisk(domain, disk)
        chosen = tuple(wanted) if wanted else tuple(self.sizes)
        return Plan(chosen, tuple(d for d in self.sizes if d not in chosen),
                    {d: self.sizes[d] for d in chosen}, agent=domain in self.agents)

    async def files(self, job: Job, plan: Plan) -> DomainFiles:
        """The domain's files: its definition, and `nvram[domain]` if it has one."""
        await self._enter("files", job.domain)
        files = {DEFINITION: f"<domain><name>{job.domain}</name></domain>".encode()}
        if job.domain in self.nvram:
            files[NVRAM] = self.nvram[job.domain]
        return DomainFiles(files)

    async def freeze(self, job: Job, mountpoints: list[str] | None) -> int:
        await self._enter("freeze", job.domain)
        self._agent(job.domain)
        self.frozen.add(job.domain)
        return 1

    async def thaw(self, job: Job) -> int:
        await self._enter("thaw", job.domain)
        self._agent(job.domain)
        if job.domain not in self.frozen:
            return 0
        self.frozen.discard(job.domain)
        return 1

    def _agent(self, domain: str) -> None:
        """As libvirt answers a call to the agent of a domain that has none connected."""
        if domain not in self.agents:
            raise AgentError("Guest agent is not responding: QEMU guest agent is not "
                             "connected")

    async def begin(self, job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        skip = plan.skip
        await self._enter("begin", job.domain)
        for disk, base in bases.items():
            if base.checkpoint in self.broken:
                bases[disk] = Base(None, f"the bitmap of {base.checkpoint} cannot be used")
        self.virt.checkpoint_xmls[job.domain, job.checkpoint] = xml.checkpoint(
            job.checkpoint, list(bases), skip)
        if job.kind == Kind.PUSH:
            disks = tuple(Exported(d, None, None, job_file(Path(str(job.target_dir)), job.id, d),
                                   b.checkpoint) for d, b in bases.items())
            for d in disks:
                assert d.target is not None
                d.target.write_bytes(b"")
            begun = Begun(None, disks)
        else:
            begun = Begun(self.socket(job), tuple(
                Exported(d, f"{d}-{job.id}", f"qemu:dirty-bitmap:backup-{d}"
                         if b.checkpoint else None, None, b.checkpoint)
                for d, b in bases.items()))
        self.backups[job.domain] = Backup(job.id, job.checkpoint, begun)

    async def exports(self, job: Job, bases: dict[str, Base]) -> Begun:
        await self._enter("exports", job.domain)
        backup = self.backups.get(job.domain)
        if backup is None or backup.job != job.id:
            if job.kind == Kind.PUSH:  # a small push may be over already
                return Begun(None, tuple(
                    Exported(d, None, None, job_file(Path(str(job.target_dir)), job.id, d),
                             b.checkpoint) for d, b in bases.items()))
            raise LibvirtError(-1, "the backup job ended as soon as it started")
        return backup.begun

    def socket(self, job: Job) -> Path:
        return self.dir / f"{job.id}.sock"

    async def running(self, job: Job) -> bool:
        await self._enter("running", job.domain)
        backup = self.backups.get(job.domain)
        return backup is not None and backup.job == job.id

    async def reachable(self, job: Job) -> bool:
        await self._enter("reachable", job.domain)
        return job.domain not in self.unreachable

    async def end(self, job: Job) -> bool:
        await self._enter("end", job.domain)
        backup = self.backups.get(job.domain)
        if backup is None or backup.job != job.id:
            return False
        del self.backups[job.domain]
        return True

    async def why_ended(self, job: Job, error: str | None) -> str:
        await self._enter("why_ended", job.domain)
        return f"the fake source ended the backup: {error}"

    def sweep(self, running: set[str]) -> None:
        self.calls.append(("sweep", ""))
        if "sweep" in self.errors:
            raise self.errors["sweep"]
        self.swept.append(set(running))

    async def cause(self, job: Job) -> str | None:
        await self._enter("cause", job.domain)
        return self.causes.get(job.domain)

    async def usage(self, job: Job) -> Scratch | None:
        await self._enter("usage", job.domain)
        if job.domain not in self.backups:
            return None
        return Scratch(4096, sum(self.sizes.values()))

    async def follow(self, sink: Sink, started: Callable[[], None]) -> None:
        self._sink, self._lost = sink, anyio.Event()
        try:
            started()
            await self._lost.wait()
            await sink.lost(self._lost_reason)
        finally:
            self._sink = self._lost = None

    async def unowned(self, busy: Callable[[str], bool]) -> list[Unowned]:
        await self._enter("unowned", "")
        found = []
        for domain, backup in self.backups.items():
            if busy(domain) or backup.begun.socket is None:
                continue  # someone's job, or a push: not one pullbackd can serve again
            ours = tuple(name for (d, name) in self.virt.checkpoint_xmls
                         if d == domain and name.startswith(PREFIX)
                         and name.endswith(f".{backup.job}"))
            consumer = ours[0][len(PREFIX):-len(backup.job) - 1] if len(ours) == 1 else ""
            if not CONSUMER.fullmatch(consumer):
                found.append(Unowned(domain, backup.job, ours, None, backup.begun, {}, now(),
                                     "", ()))
                continue
            checkpoint_xml = self.virt.checkpoint_xmls[domain, ours[0]]
            found.append(Unowned(domain, backup.job, ours, consumer, backup.begun,
                                 {d.name: self.sizes[d.name] for d in backup.begun.disks}, now(),
                                 checkpoint_xml, xml.parse_checkpoint(checkpoint_xml).disks))
        return found

    async def end_unowned(self, backup: Unowned) -> None:
        await self._enter("end_unowned", backup.domain)
        self.backups.pop(backup.domain, None)
        for name in backup.checkpoints:
            self.virt.checkpoint_xmls.pop((backup.domain, name), None)

    # What libvirt's events would tell.

    @property
    def sink(self) -> Sink:
        if self._sink is None:
            raise AssertionError("nobody follows the source (Jobs.follow_events)")
        return self._sink

    def ended(self, domain: str, success: bool = True, error: str | None = None) -> None:
        """The domain's backup ended without pullbackd asking (a push finished, or
        someone ended it)."""
        self.backups.pop(domain, None)
        self.sink.ended(domain, success, error)

    def stopped(self, domain: str, reason: str = "destroyed") -> None:
        """The domain stopped, and its backup with it."""
        self.virt.running[domain] = False
        self.backups.pop(domain, None)
        self.sink.stopped(domain, reason)

    def lose(self, reason: str) -> None:
        """The source is gone (libvirtd died): `follow` tells the sink, and returns."""
        if self._lost is None:
            raise AssertionError("nobody follows the source (Jobs.follow_events)")
        self._lost_reason = reason
        self._lost.set()

