"""Consistent backups: the guest's filesystems frozen through its agent while the backup
begins, and thawed right after.

The freeze lasts as long as the source takes to begin (libvirt's backup begin: the
checkpoint's bitmaps and the point in time are taken then), never while data is read: a
guest's own software (Windows' VSS) holds a freeze for about 10 s at most.

Invariants:
- A guest frozen by pullbackd is thawed on every path: after the begin, whether it worked or
  not, shielded from cancellation; at a restart after a crash, for every job that may have
  frozen it (recovery.py); a thaw that fails is retried, then logged with what the
  operator can do.
- A job may have frozen its guest, as far as the state database knows, from before the
  freeze is asked until its thaw was answered, or nothing was frozen (`Thaws.freezing`,
  `Thaws.over`: a row of state.py's `freezes`, in, then out; a thaw owed in its place is
  recorded in that same transaction). A restart thaws the guests of those jobs alone: a crash
  before the freeze, after the thaw, or during a Start that froze nothing (quiesce "off",
  "auto" on a domain without an agent) leaves the guest as it is, which may be someone
  else's freeze made while pullbackd was down (`virsh domfsfreeze` before a storage
  snapshot); and a domain without an agent is not asked for thaws for an hour. A crash
  while the freeze was asked thaws the guest: the freeze may have happened. It costs a
  Start that freezes two small writes (the row in, and out) and one that does not none.
  Recovery checks it at every start: a job no longer starting holds no such row (one left
  by a write that failed is thawed all the same, and logged).
- No Start waits on the agent for long: a freeze or a thaw it does not answer within
  `[jobs] agent_timeout` has failed (libvirt's own wait is for ever: virt.py). The agent
  answers in order, so a freeze it did not answer may still freeze the guest once it ends
  (its writes held up, say): after a freeze or a thaw that went unanswered, a thaw is owed,
  recorded, and asked in the background until one is answered, across restarts (`Thaws`);
  a new freeze of the domain takes it over.
- A freeze the agent refused (it answered with an error: AgentError.refused) froze
  nothing, and is followed by no thaw: the guest may be frozen by someone else (qemu-ga
  refuses a freeze while frozen), theirs to thaw; unless a thaw of ours was owed (an
  earlier freeze of ours the agent did not answer may be what froze it).
- "required" changes nothing when no agent is connected (checked before anything is
  recorded) and fails the job when the agent does not freeze; "auto" goes on
  crash-consistent, with a warning.
- A job is "filesystem" consistent only if the freeze held until the begin ended: the
  agent's answer to the thaw that follows tells that it thawed as many filesystems as
  the freeze froze. A guest may end a freeze by itself (Windows' VSS after 10 s: the thaw
  is answered "couldn't hold writes"), or someone else thaw it (it is answered less):
  then the backup's point in time may be after the thaw, and it is crash-consistent
  ("required": the job fails, its backup ended by the caller). A thaw the agent does not
  answer tells nothing: the freeze did not end by itself as far as anyone knows.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from . import crash
from .errors import NoSuchDomain, PullbackError, QuiesceFailed
from .model import Job, StartRequest
from .source import BackupSource, Plan
from .state import Store
from .virt import AgentError

log = structlog.get_logger()

#: A failed thaw is tried again this many times, a second apart.
THAW_ATTEMPTS = 5
#: After a freeze or a thaw the agent did not answer: seconds between the thaws asked in
#: the background, and how long they go on.
THAW_AGAIN_EVERY = 5.0
THAW_AGAIN_FOR = 3600.0
NO_AGENT = "no guest agent is connected"


@dataclass(frozen=True)
class Quiesced:
    """How consistent the backup is, how long the guest was frozen, and the warning to
    give if it was meant to be frozen and was not."""

    consistency: str
    frozen: float | None = None
    warning: str | None = None
    #: "required", and the freeze did not hold until the begin ended: why. The backup
    #: began; the caller ends it and fails the job (QuiesceFailed).
    failed: str | None = None


def check(request: StartRequest, plan: Plan) -> None:
    """Before anything is recorded: "required" with no agent to ask is refused."""
    if request.quiesce == "required" and not plan.offline and not plan.agent:
        raise QuiesceFailed(request.domain, NO_AGENT)


async def begin(source: BackupSource, job: Job, request: StartRequest, plan: Plan,
                begin: Callable[[], Awaitable[None]], thaws: Thaws) -> Quiesced:
    """`begin` (the source beginning the job's backup), frozen as `request` asks; `thaws`
    goes on with a thaw the agent does not answer. Raises QuiesceFailed ("required" and
    the agent did not freeze), and what `begin` raises."""
    if plan.offline:
        await begin()
        # Destroyed, crashed: its disks are as the power going left them.
        return Quiesced("shut off" if plan.clean else "crash")
    if request.quiesce == "off":
        await begin()
        return Quiesced("crash")
    why = NO_AGENT
    if plan.agent:
        owed = await thaws.freezing(job)  # a crash from here on thaws the guest at a restart
        try:
            count = await source.freeze(job, request.mountpoints)
        except (AgentError, PullbackError) as e:
            why = f"the guest agent did not freeze the filesystems: {e}"
            with anyio.CancelScope(shield=True):
                if isinstance(e, AgentError) and e.refused and not owed:
                    # It froze nothing; the guest may be someone else's freeze, not ours
                    # to end.
                    log.info("not thawing the guest: its agent refused the freeze (it may "
                             "be frozen by someone else)", job=job.id, error=str(e))
                    thawed = True
                else:
                    # It may have frozen them all the same (libvirt stopped waiting
                    # first), or an earlier freeze of ours the agent did not answer may have.
                    thawed = (await thaw(source, job, attempts=1, frozen=False)).thawed
                await thaws.over(source, job, thawed=thawed)
        else:
            return await _frozen(source, job, request, count, begin, thaws)
    if request.quiesce == "required":
        raise QuiesceFailed(job.domain, why)
    await begin()
    return Quiesced("crash", warning=f"{why}; the backup is crash-consistent")


async def _frozen(source: BackupSource, job: Job, request: StartRequest, count: int,
                  begin: Callable[[], Awaitable[None]], thaws: Thaws) -> Quiesced:
    """`begin`, the guest's `count` filesystems frozen; thawed after it, whatever happens."""
    began = time.monotonic()
    try:
        crash.point("start.frozen")
        await begin()
    finally:
        with anyio.CancelScope(shield=True):  # a guest must never stay frozen
            thawed = await thaw(source, job, froze=count)
            await thaws.over(source, job, thawed=thawed.thawed)
    frozen = round(time.monotonic() - began, 3)
    if thawed.held is not False:
        return Quiesced("filesystem", frozen)
    why = (f"the guest's filesystems were no longer frozen when the backup had begun "
           f"({frozen:g} s after the freeze: {thawed.why}), and the backup's point in time "
           "may be after that")
    if request.quiesce == "required":
        return Quiesced("crash", failed=why)
    return Quiesced("crash", warning=f"{why}; the backup is crash-consistent")


@dataclass(frozen=True)
class Thawed:
    """What a thaw did: whether the guest is thawed, and whether the freeze still held
    when it was asked, by the agent's answer to the first try (`held`; None: that try was
    not answered, or failed before it reached the agent), and if not, why."""

    thawed: bool
    held: bool | None = None
    why: str = ""


async def thaw(source: BackupSource, job: Job, attempts: int = THAW_ATTEMPTS, *,
               frozen: bool = True, froze: int = 1) -> Thawed:
    """Thaw the job's guest (nothing frozen: nothing done), trying again a few times;
    whether it is thawed, and whether the `froze` filesystems a freeze froze were all still
    frozen. Logs what it could not do (and, if the guest may be `frozen`, how to thaw
    it), and never raises: a thaw that fails must not hide the result of what it
    follows."""
    held: bool | None = None
    why = ""
    for attempt in range(1, attempts + 1):
        try:
            count = await source.thaw(job)
        except (AgentError, PullbackError) as e:
            log.warning("cannot thaw the guest's filesystems", job=job.id, attempt=attempt,
                        error=str(e))
            if attempt == 1 and isinstance(e, AgentError) and e.refused:
                held, why = False, f"the agent answered the thaw: {e}"
            if attempt < attempts:
                await anyio.sleep(1)
            continue
        if attempt == 1:
            held = count >= max(1, froze)
            why = f"the agent thawed {count} of the {froze} filesystems it froze"
        return Thawed(True, held, why)
    if frozen:
        log.error("the guest's filesystems may still be frozen: thaw them with `virsh "
                  f"domfsthaw {job.domain}`", job=job.id)
    return Thawed(False, held, why)


@dataclass
class _Owed:
    """A thaw owed: the scope that asks for it, and whether that is over."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    over: anyio.Event = field(default_factory=anyio.Event)


class Thaws:
    """The thaws owed after a freeze or a thaw the agent did not answer, at most one per
    domain, each asked again in the background until it is answered (`thaw_when_answered`).
    Each is recorded (state.py) until it is over: a restart of pullbackd goes on with it
    (`resume`). A new freeze of the domain takes it over (`take_over`): its Start's own thaw
    follows its begin, and a thaw owed from before must not thaw the guest under it. The
    record of the jobs that may have frozen their guest is kept here too (`freezing`,
    `over`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._owed: dict[str, _Owed] = {}
        #: Where the thaws are asked for: `serve`'s task group.
        self._tg: anyio.abc.TaskGroup | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Ask for the thaws owed until cancelled (with the jobs' copies and endpoints:
        Jobs.follow_events)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    def _later(self, task: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._tg is None:
            raise RuntimeError("the thaws owed are not being asked for (serve is not running)")
        self._tg.start_soon(task)

    async def freezing(self, job: Job) -> bool:
        """Before the job's freeze of its guest: recorded (a restart after a crash thaws
        the guest from now on, recovery.py), then the thaw owed the domain, if any, taken
        over (`take_over`); whether one was. Raises what the database raises: nothing is
        frozen then."""
        await self._store.save_freeze(job.domain, job.id)
        return await self.take_over(job.domain)

    async def over(self, source: BackupSource, job: Job, *, thawed: bool) -> None:
        """The job's freeze (`freezing`) is over: its guest `thawed`, or nothing frozen;
        if not, a thaw is owed, recorded in the same transaction, and asked. What cannot
        be recorded is logged (a restart thaws the guest once more; a thaw owed is asked
        all the same, in this run)."""
        owe = not thawed and job.domain not in self._owed
        try:
            await self._store.delete_freeze(job.id, thaw=job.domain if owe else None)
        except Exception:
            log.exception("cannot record that a freeze of the guest is over (a restart of "
                          "pullbackd thaws it)", job=job.id, domain=job.domain)
        if owe:
            self._ask(source, job)

    async def take_over(self, domain: str) -> bool:
        """No thaw owed the domain any more, none under way either (one in a worker
        thread takes THAW_WAIT at most); whether one was. Every thaw recorded is owed here
        from the start on (`resume`): a domain owed none costs a Start no write."""
        if (owed := self._owed.pop(domain, None)) is None:
            return False
        owed.scope.cancel()
        await owed.over.wait()
        await self._forget(domain)
        return True

    def resume(self, source: BackupSource, job_of: Callable[[str], Job | None]) -> None:
        """The thaws an earlier run owed (`job_of`: a job by its id; one forgotten since
        is no longer owed a thaw: days have passed)."""
        for domain, job_id in self._store.load_thaws().items():
            job = job_of(job_id)
            if job is None or job.domain != domain:
                self._later(functools.partial(self._forget, domain))
            elif domain not in self._owed:
                self._ask(source, job)

    async def _forget(self, domain: str) -> None:
        try:
            await self._store.delete_thaw(domain)
        except Exception:  # the next start asks once more: no harm
            log.exception("cannot record that a thaw is no longer owed", domain=domain)

    def _ask(self, source: BackupSource, job: Job) -> None:
        owed = self._owed[job.domain] = _Owed()

        async def ask() -> None:
            try:
                with owed.scope:
                    await thaw_when_answered(source, job)
                    await self._forget(job.domain)
            except anyio.get_cancelled_exc_class():
                log.info("a thaw of the guest's filesystems is still owed: pullbackd goes "
                         "on with it when it starts again", job=job.id, domain=job.domain)
                raise
            except Exception:  # a bug: it must not end the jobs' task group
                log.exception("BUG: asking for a thaw owed failed; the next start of "
                              "pullbackd asks again", job=job.id, domain=job.domain)
            finally:
                owed.over.set()
                if self._owed.get(job.domain) is owed:
                    del self._owed[job.domain]

        self._later(ask)


async def thaw_when_answered(source: BackupSource, job: Job) -> None:
    """After a freeze or a thaw the agent did not answer: a thaw every THAW_AGAIN_EVERY
    seconds until one is answered (the agent's earlier commands are over then, and the
    guest thawed), for THAW_AGAIN_FOR at most, or until the domain is gone. Whatever
    else stops a thaw (the domain paused, libvirt restarting, another client's agent
    call) may pass: it is asked again. Raises nothing but cancellation."""
    deadline = time.monotonic() + THAW_AGAIN_FOR
    last = ""
    while time.monotonic() < deadline:
        await anyio.sleep(THAW_AGAIN_EVERY)
        try:
            await source.thaw(job)
        except NoSuchDomain:
            log.info("no thaw owed any more: the domain is gone", job=job.id)
            return
        except (AgentError, PullbackError) as e:
            last = str(e)
            continue
        log.info("the guest agent answered again: the guest's filesystems are thawed",
                 job=job.id)
        return
    log.error("a thaw of the guest has failed for an hour: its filesystems may be frozen: "
              f"thaw them with `virsh domfsthaw {job.domain}`", job=job.id, error=last)
