#!/usr/bin/python3
"""A raft_kv client that rides through leader changes, restarts and lost connections.

    examples/client.py DSN put KEY VALUE
    examples/client.py DSN get KEY
    examples/client.py DSN load PREFIX COUNT

DSN names every node, libpq's multi-host form:
    "host=10.0.0.1,10.0.0.2,10.0.0.3 port=5432,5432,5432 dbname=app user=app connect_timeout=2"

The rules it follows, which any client of raft_kv should:
- A write gets its request_id once, before the first attempt, and keeps it through every retry:
  if an attempt did apply, the retry returns that attempt's revision and writes nothing.
- It retries, with the same id and on the next node, after 40001 (certainly not written),
  40003 (outcome unknown), a lost connection or a cancelled statement.
- It never retries 22xxx (bad input) or 0A000 (not supported here): those fail the same way
  on every node.
- Reads are linearizable (raft_get's default); they are retried like writes.

`load` writes COUNT keys PREFIX0..PREFIX<COUNT-1> one at a time and prints "ok KEY REVISION" for
each acknowledged write, "retry SQLSTATE" for each retry; `put` prints the revision. Exit
status: 0 on success, 2 on an error it must not retry, 3 when retries ran out.

Needs psycopg 3 (Debian: python3-psycopg).
"""

import sys
import time
import uuid

import psycopg
from psycopg import conninfo

RETRY_STATES = {"40001", "40003", "57014", "57P01", "57P02", "57P03", "08000", "08003", "08006"}


class Fatal(Exception):
    """An error retrying cannot fix (bad input, unsupported use, permissions)."""


class RaftKV:
    def __init__(self, dsn, deadline_s=60.0, log=sys.stderr):
        params = conninfo.conninfo_to_dict(dsn)
        hosts = str(params.pop("host", "localhost")).split(",")
        ports = str(params.pop("port", "5432")).split(",")
        if len(ports) == 1:
            ports = ports * len(hosts)
        self.nodes = list(zip(hosts, ports))
        self.params = params
        self.first = 0  # the node tried first; moves on after a failure
        self.deadline_s = deadline_s
        self.log = log
        self.conn = None

    def _connect(self):
        # libpq tries the hosts in order until one answers: start at the current node.
        order = self.nodes[self.first:] + self.nodes[:self.first]
        dsn = conninfo.make_conninfo(
            **self.params,
            host=",".join(h for h, _ in order),
            port=",".join(p for _, p in order),
        )
        self.conn = psycopg.connect(dsn, autocommit=True)

    def _next_node(self):
        self.first = (self.first + 1) % len(self.nodes)
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def _run(self, sql, args):
        """Runs one statement until it succeeds, retrying what is safe to retry."""
        give_up = time.monotonic() + self.deadline_s
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self._connect()
                return self.conn.execute(sql, args).fetchone()[0]
            except psycopg.OperationalError as e:
                state = e.sqlstate or "08006"  # no SQLSTATE: the connection is gone
                if state not in RETRY_STATES and not state.startswith("08"):
                    raise Fatal(f"{state}: {e}") from e
                retry = state
            except psycopg.Error as e:
                if e.sqlstate not in RETRY_STATES:
                    raise Fatal(f"{e.sqlstate}: {e}") from e
                retry = e.sqlstate
            if time.monotonic() > give_up:
                raise TimeoutError(f"still failing ({retry}) after {self.deadline_s} s")
            print(f"retry {retry}", file=self.log, flush=True)
            self._next_node()
            time.sleep(0.05)

    def put(self, key, value):
        request_id = str(uuid.uuid4())  # once per logical write, kept across retries
        return self._run("SELECT raft_set(%s, %s, request_id => %s)", (key, value, request_id))

    def get(self, key):
        return self._run("SELECT raft_get(%s)", (key,))


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    kv = RaftKV(argv[1])
    try:
        if argv[2] == "put" and len(argv) == 5:
            print(kv.put(argv[3], argv[4]))
        elif argv[2] == "get" and len(argv) == 4:
            value = kv.get(argv[3])
            print("" if value is None else value)
        elif argv[2] == "load" and len(argv) == 5:
            prefix, count = argv[3], int(argv[4])
            for i in range(count):
                key = f"{prefix}{i}"
                rev = kv.put(key, f"v{i}")
                if kv.get(key) != f"v{i}":
                    raise Fatal(f"read of {key} after its write did not return it")
                print(f"ok {key} {rev}", flush=True)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Fatal as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
