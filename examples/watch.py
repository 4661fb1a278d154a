#!/usr/bin/python3
"""Follow every change under a key prefix in raft_kv, in order, with no gaps.

    examples/watch.py DSN PREFIX [SINCE_REVISION] [--count N]

Prints one line per change: "<revision> <put|delete> <key> <value>". The contract: call
raft_watch with the last revision seen + 1. After a disconnect, a restart of the server or a
leader change, reconnect (to any node) and carry on from the same revision: nothing is missed
or repeated. A revision that was compacted away (SQLSTATE 72000) means the history is gone:
re-read the state with raft_scan and follow from its revision.

Needs psycopg 3 (Debian: python3-psycopg).
"""

import argparse
import sys
import time

import psycopg
from psycopg import errors


def follow(dsn, prefix, since, count=None):
    seen = 0
    while count is None or seen < count:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while count is None or seen < count:
                    # Blocks in the server until a change under the prefix is applied on this
                    # node (or 10 s pass): woken by the raft_kv worker, not by polling.
                    rows = conn.execute(
                        "SELECT revision, kind, key, value FROM raft_watch(%s, %s, '10 seconds')",
                        (prefix, since),
                    ).fetchall()
                    for revision, kind, key, value in rows:
                        print(revision, kind, key, value if value is not None else "", flush=True)
                        since = revision + 1
                        seen += 1
        except errors.SnapshotTooOld as e:
            sys.exit(f"history before revision {since} was compacted: {e.diag.message_detail}")
        except psycopg.OperationalError as e:
            # The server went away: reconnect and resume from `since`.
            print(f"# reconnecting after: {e}".strip(), file=sys.stderr, flush=True)
            time.sleep(0.5)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dsn")
    p.add_argument("prefix")
    p.add_argument("since", type=int, nargs="?", default=1)
    p.add_argument("--count", type=int, help="stop after this many changes")
    a = p.parse_args()
    follow(a.dsn, a.prefix, a.since, a.count)


if __name__ == "__main__":
    main()
