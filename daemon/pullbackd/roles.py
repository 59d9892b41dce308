"""Who may do what on the control socket and on the jobs' endpoints.

Reaching a socket ([control] mode and group, [exports] mode and group) lets a
process talk; its role, from its peer credentials (SO_PEERCRED) and [roles] in
the configuration, decides which methods answer and whether it may read backups:

    look     Get, List, Watch, ListCheckpoints (and varlink's GetInfo)
    backup   look, and Start, Finish, Abort, DomainFiles, ReadDomainFile, Verify, and
             reading the backups' disks (READ_DISKS)
    admin    backup, and Migrate, DeleteChain, Prune, Restore, RestoreDomain

Root is admin. Anyone else gets the highest role that lists their user name or
one of their groups ("@group"), else [roles] default. A call beyond the
caller's role is refused with PermissionDenied, and changes nothing; a
connection to a job's endpoint beyond it is closed before it is relayed, and
the jobs' export names are not shown to it.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from enum import IntEnum

from .errors import PermissionDenied


class Role(IntEnum):
    NONE = 0
    LOOK = 1
    BACKUP = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


#: The role each method of org.pullbackd.Backup needs.
METHODS = {
    "Get": Role.LOOK, "List": Role.LOOK, "Watch": Role.LOOK, "ListCheckpoints": Role.LOOK,
    "Start": Role.BACKUP, "Finish": Role.BACKUP, "Abort": Role.BACKUP,
    # It reads every backup of the domain in the repository, for as long as that takes.
    "Verify": Role.BACKUP,
    # A backup's NVRAM and TPM state are as secret as its disks.
    "DomainFiles": Role.BACKUP, "ReadDomainFile": Role.BACKUP,
    "Migrate": Role.ADMIN, "DeleteChain": Role.ADMIN, "Prune": Role.ADMIN,
    "Restore": Role.ADMIN, "RestoreDomain": Role.ADMIN,
}

#: The role that reads a pull backup's disks: through the job's endpoint (exports.py), and
#: by knowing its export names, which on the TCP endpoint are what let a client in
#: (remote.py). What Start and Finish, the appliance's calls, are for.
READ_DISKS = Role.BACKUP


def parse(label: str) -> Role:
    """A role by its name in the configuration ("none", "look", "backup", "admin")."""
    return Role[label.upper()]


@dataclass(frozen=True)
class Roles:
    """[roles]: user names and "@group" names per role, and the role of everyone else."""

    admin: tuple[str, ...] = ()
    backup: tuple[str, ...] = ()
    look: tuple[str, ...] = ()
    default: Role = Role.BACKUP

    def of(self, uid: int, gid: int) -> Role:
        """The role of a peer (blocking: user and group lookups may ask NSS)."""
        if uid == 0:
            return Role.ADMIN
        names = _names(uid, gid)
        for role, members in ((Role.ADMIN, self.admin), (Role.BACKUP, self.backup),
                              (Role.LOOK, self.look)):
            if names & set(members):
                return role
        return self.default

    @staticmethod
    def check(role: Role, method: str) -> None:
        """Raise PermissionDenied unless `role` may call `method`."""
        if role < METHODS.get(method, Role.ADMIN):
            raise PermissionDenied(method, role.label)

    @staticmethod
    def reads_disks(role: Role) -> bool:
        """Whether `role` may read the backups' disks (READ_DISKS)."""
        return role >= READ_DISKS

    @staticmethod
    def changes(method: str) -> bool:
        """Whether a method changes something (and so is written to the log)."""
        return METHODS.get(method, Role.ADMIN) > Role.LOOK


def _names(uid: int, gid: int) -> set[str]:
    """The user's name and "@group" for each group the user is in."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {f"@{_group(gid)}"}  # a uid without a name: its primary group only
    return {user, *(f"@{_group(g)}" for g in os.getgrouplist(user, gid))}


def user_name(uid: int) -> str:
    """A user's name, or "uid N" for a uid without one (as in what pullbackd runs as)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
