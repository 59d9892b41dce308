"""The errors pullbackd reports to its callers.

Each class is the varlink error of the same name in `org.pullbackd.Backup`,
with the same parameters: the control socket turns one into the other, and a
test checks that the two lists agree. The message says what to do next.
"""

from __future__ import annotations

from typing import Any


class PullbackError(Exception):
    """An error the caller can act on. Anything else is a bug, logged and hidden."""

    def __init__(self, text: str, /, **parameters: Any) -> None:
        super().__init__(text)
        self.parameters = parameters

    @property
    def name(self) -> str:
        return type(self).__name__


class NoSuchDomain(PullbackError):
    def __init__(self, domain: str) -> None:
        super().__init__(f"no domain named {domain!r}", domain=domain)


class DomainNotRunning(PullbackError):
    def __init__(self, domain: str) -> None:
        super().__init__(f"domain {domain!r} is not running (a backup of it may start again, "
                         "while it is off; a migration needs it running)", domain=domain)


class NoSuchDisk(PullbackError):
    def __init__(self, domain: str, disk: str) -> None:
        super().__init__(f"domain {domain!r} has no disk {disk!r} that can be backed up",
                         domain=domain, disk=disk)


class BackupInProgress(PullbackError):
    def __init__(self, domain: str, id: str) -> None:
        who = f"job {id}" if id else "a backup not started by pullbackd"
        super().__init__(
            f"domain {domain!r} is already being backed up by {who}; finish or abort it first",
            domain=domain,
            id=id,
        )


class DomainBusy(PullbackError):
    def __init__(self, domain: str, operation: str) -> None:
        super().__init__(
            f"domain {domain!r} is busy with a libvirt {operation} job; try again when it ends",
            domain=domain,
            operation=operation,
        )


class NoSuchCheckpoint(PullbackError):
    def __init__(self, domain: str, consumer: str, checkpoint: str) -> None:
        super().__init__(
            f"{checkpoint!r} is not a checkpoint of consumer {consumer!r} on {domain!r}; "
            "list them with `pullbackctl checkpoints`",
            domain=domain, consumer=consumer, checkpoint=checkpoint)


class ChainOfAnother(PullbackError):
    def __init__(self, domain: str, consumer: str, owner: str) -> None:
        super().__init__(
            f"the chain of consumer {consumer!r} on {domain!r} is {owner}'s: a backup of "
            f"yours would join it, and the next incremental of theirs would miss what "
            "changed before it; back up as a consumer of your own, or have an "
            "administrator delete that chain (`pullbackctl chain delete`)",
            domain=domain, consumer=consumer, owner=owner)


class JobOfAnother(PullbackError):
    def __init__(self, id: str, owner: str) -> None:
        super().__init__(
            f"job {id} was started by {owner}: only they may finish it, and they or an "
            "administrator abort it",
            id=id, owner=owner)


class NoBackup(PullbackError):
    def __init__(self, domain: str, consumer: str, disk: str | None) -> None:
        what = repr(domain) if disk is None else f"disk {disk!r} of {domain!r}"
        super().__init__(
            f"the local repository holds no complete backup of {what} for consumer "
            f"{consumer!r} (a backup still being written, or one that failed, is none); "
            "wait for the backup under way to complete, or back the domain up with "
            "destination \"local\"", domain=domain, consumer=consumer, disk=disk)


class TargetNotWritable(PullbackError):
    def __init__(self, target_dir: str, reason: str) -> None:
        super().__init__(f"cannot write push backups into {target_dir}: {reason}",
                         target_dir=target_dir, reason=reason)


class ImageNotReachable(PullbackError):
    def __init__(self, domain: str, disk: str, path: str, reason: str) -> None:
        super().__init__(
            f"{domain!r} is shut off and pullbackd cannot serve {disk}'s image {path}: {reason}",
            domain=domain, disk=disk, path=path, reason=reason)


class QuiesceFailed(PullbackError):
    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(
            f"the guest agent of {domain!r} did not freeze its filesystems: {reason}; start "
            "with quiesce \"auto\" for a crash-consistent backup, or fix the agent",
            domain=domain, reason=reason)


class JobNotReady(PullbackError):
    def __init__(self, id: str, state: str) -> None:
        super().__init__(f"job {id} is {state}: a push backup ends by itself; Abort stops it",
                         id=id, state=state)


class InsufficientScratch(PullbackError):
    def __init__(self, dir: str, needed: int, available: int) -> None:
        super().__init__(
            f"{dir} can hold {available} bytes of scratch, and the worst case of the running "
            f"pull backups with this one is {needed}: free space, or back up fewer disks, or "
            "start with allow_scratch_overcommit", dir=dir, needed=needed, available=available)


class NoSuchJob(PullbackError):
    def __init__(self, id: str) -> None:
        super().__init__(f"no job {id!r}; list jobs with `pullbackctl backup list`", id=id)


class WatchTooSlow(PullbackError):
    def __init__(self, events: int) -> None:
        super().__init__(
            f"this Watch fell over {events} events behind the jobs' changes and pullbackd "
            "stopped holding them; Watch again, and Get or List the jobs to see what changed "
            "meanwhile", events=events)


class LibvirtError(PullbackError):
    """libvirt failed in a way we have no better name for; its message is passed on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"libvirt error {code}: {message}", code=code, message=message)


class InvalidParameter(PullbackError):
    """A parameter has the right type but a value we cannot use.

    Crosses the socket as `org.varlink.service.InvalidParameter`.
    """

    def __init__(self, parameter: str, why: str) -> None:
        super().__init__(f"invalid {parameter}: {why}", parameter=parameter)


class SessionsActive(PullbackError):
    def __init__(self, id: str, sessions: int, waited: float) -> None:
        super().__init__(
            f"job {id} still has {sessions} NBD sessions open after {waited:g} s; let the "
            "appliance close them and call Finish again, or Abort to cut them off",
            id=id, sessions=sessions, waited=waited)


class TooManyJobs(PullbackError):
    def __init__(self, limit: int, active: int) -> None:
        super().__init__(
            f"{active} backups are running, the limit ([jobs] max_active) is {limit}; try "
            "again later, or leave queue on to wait in line", limit=limit, active=active)


class MigrationPending(PullbackError):
    def __init__(self, domain: str) -> None:
        super().__init__(f"domain {domain!r} is being drained for a migration; back it up "
                         "where it lands", domain=domain)


class MigrationBlocked(PullbackError):
    def __init__(self, domain: str, jobs: list[str], sessions: int) -> None:
        super().__init__(
            f"domain {domain!r} still has backups running ({', '.join(jobs)}; {sessions} "
            "sessions open) after the drain timeout; the migration did not start. Wait for "
            "them, or migrate with force to abort them", domain=domain, jobs=jobs,
            sessions=sessions)


class RepositoryError(PullbackError):
    """The local repository could not read or write a backup's file (or a restore's)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"repository: {path}: {reason}", path=path, reason=reason)


class PermissionDenied(PullbackError):
    def __init__(self, method: str, role: str) -> None:
        super().__init__(
            f"{method} needs a role that yours ({role}) does not include; ask the host's "
            "administrator for one in [roles] of pullbackd's configuration",
            method=method, role=role)
