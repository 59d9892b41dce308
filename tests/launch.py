"""Start a program the way systemd passes a service its stored descriptors.

    python launch.py FDS NAMES PROGRAM [ARG...]

FDS: descriptors of this process, comma-separated; they become 3, 4, ... in
PROGRAM, named by NAMES (colon-separated) in $LISTEN_FDNAMES. $LISTEN_PID must be
the service's own pid, known only after the fork: hence this step before exec.
"""

import fcntl
import os
import sys

fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
# Out of the way of 3..3+n first, then into place.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
