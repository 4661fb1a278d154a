-- raft_kv's tables, roles, grants and views, created after every function (the grants name
-- them): src/lib.rs includes this file with extension_sql_file!.

-- The Raft log. Written only by the worker, one transaction per Ready.
CREATE TABLE raft_kv.log (
    idx     bigint   PRIMARY KEY,
    term    bigint   NOT NULL,
    kind    smallint NOT NULL,
    data    bytea    NOT NULL,
    context bytea    NOT NULL
);

-- Hard state, conf state, snapshot point and applied index: one row.
CREATE TABLE raft_kv.state (
    id             int    PRIMARY KEY CHECK (id = 1),
    term           bigint NOT NULL DEFAULT 0,
    vote           bigint NOT NULL DEFAULT 0,
    commit_index   bigint NOT NULL DEFAULT 0,
    applied_index  bigint NOT NULL DEFAULT 0,
    conf_state     bytea  NOT NULL DEFAULT '',
    snapshot_index bigint NOT NULL DEFAULT 0,
    snapshot_term  bigint NOT NULL DEFAULT 0,
    -- The cluster's random id (16 bytes), set by the first leader through the log; empty
    -- until then. Every hello carries it: a peer of another cluster is refused.
    cluster_id     bytea  NOT NULL DEFAULT '',
    -- The store's revision (etcd's: +1 per applied command that changes something) and the
    -- history compaction point (history below it is gone).
    revision         bigint NOT NULL DEFAULT 0,
    compact_revision bigint NOT NULL DEFAULT 0
);
INSERT INTO raft_kv.state (id) VALUES (1);

-- The replicated key-value state machine, with etcd's per-key metadata: the revision of
-- the last write, the revision that created the key, and its writes since.
CREATE TABLE raft_kv.kv (
    key             text   COLLATE "C" PRIMARY KEY,
    value           text   NOT NULL,
    mod_revision    bigint NOT NULL,
    create_revision bigint NOT NULL,
    version         bigint NOT NULL,
    -- The lease the key is attached to (0: none); it goes when the lease does.
    lease           bigint NOT NULL DEFAULT 0
);
CREATE INDEX kv_lease ON raft_kv.kv (lease) WHERE lease <> 0;

-- Leases (etcd's): granted, kept alive, revoked and expired through the log. refreshes counts
-- grants and keepalives; an expiry decided on an older count does nothing.
CREATE TABLE raft_kv.leases (
    id        bigint PRIMARY KEY,
    ttl_ms    bigint NOT NULL,
    refreshes bigint NOT NULL
);

-- History: every change to a key, at the revision that made it, written in the transaction
-- that applies it, identically on every node; kept from state.compact_revision on. For a
-- delete, value is NULL and create_revision/version describe the deleted key. prev_value and
-- prev_mod_revision are the key's state before (NULL: it did not exist).
CREATE TABLE raft_kv.changes (
    revision          bigint NOT NULL,
    key               text   COLLATE "C" NOT NULL,
    kind              text   NOT NULL CHECK (kind IN ('put', 'delete')),
    value             text,
    prev_value        text,
    create_revision   bigint NOT NULL,
    version           bigint NOT NULL,
    prev_mod_revision bigint,
    PRIMARY KEY (revision, key)
);
-- Reads at a past revision look for a key's first change after it.
CREATE INDEX changes_key ON raft_kv.changes (key, revision);

-- Values and log entries are compressed with lz4 where the server was built with it: with
-- pglz, compressing took 78 % of the CPU of writing 1 MiB values (the entry, the value and the
-- history row, on every node). The snapshot tables copy this (LIKE ... INCLUDING ALL).
DO $$
BEGIN
    ALTER TABLE raft_kv.log ALTER COLUMN data SET COMPRESSION lz4;
    ALTER TABLE raft_kv.kv ALTER COLUMN value SET COMPRESSION lz4;
    ALTER TABLE raft_kv.changes ALTER COLUMN value SET COMPRESSION lz4,
                                ALTER COLUMN prev_value SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;
END
$$;

COMMENT ON SCHEMA raft_kv IS 'raft_kv internal state: the Raft log, hard state and the key-value table';
-- Applied request ids (nonce, seq), so a retried proposal is answered instead of applied
-- twice. node is the node that proposed it. Forgotten after DEDUP_WINDOW log entries.
CREATE TABLE raft_kv.requests (
    nonce    bigint  NOT NULL,
    seq      bigint  NOT NULL,
    node     bigint  NOT NULL,
    revision bigint  NOT NULL,
    flag     boolean NOT NULL,
    PRIMARY KEY (nonce, seq)
);
CREATE INDEX requests_revision ON raft_kv.requests (revision);

-- Member addresses as the Raft log last set them, so a restarted node reaches members added
-- after bootstrap. promote: a learner to make a voter once it has caught up.
CREATE TABLE raft_kv.members (
    id      bigint  PRIMARY KEY,
    address text    NOT NULL,
    promote boolean NOT NULL DEFAULT false
);

-- The snapshot store: on the leader, a frozen copy of kv and requests at one applied index,
-- streamed to followers that need a snapshot; on a follower, the rows being received, which
-- are installed into kv and requests in one transaction. Unlogged: after a crash a transfer
-- simply starts over.
-- Only the primary keys, which chunks are read by: a secondary index made the copy of the
-- history three times slower.
CREATE UNLOGGED TABLE raft_kv.snapshot_kv (LIKE raft_kv.kv INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.snapshot_kv ADD PRIMARY KEY (key);
CREATE UNLOGGED TABLE raft_kv.snapshot_requests (LIKE raft_kv.requests INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.snapshot_requests ADD PRIMARY KEY (nonce, seq);
CREATE UNLOGGED TABLE raft_kv.snapshot_changes (LIKE raft_kv.changes INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.snapshot_changes ADD PRIMARY KEY (revision, key);
-- On a follower, the rows of a snapshot being received, in tables like the live ones (logged,
-- with their indexes under the same names prefixed incoming_): installing swaps each with its
-- live table by renaming them, so a received row is written once (storage.rs, install_by_swap).
CREATE TABLE raft_kv.incoming_kv (LIKE raft_kv.kv INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.incoming_kv ADD CONSTRAINT incoming_kv_pkey PRIMARY KEY (key);
CREATE INDEX incoming_kv_lease ON raft_kv.incoming_kv (lease) WHERE lease <> 0;
CREATE TABLE raft_kv.incoming_changes (LIKE raft_kv.changes INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.incoming_changes ADD CONSTRAINT incoming_changes_pkey PRIMARY KEY (revision, key);
CREATE INDEX incoming_changes_key ON raft_kv.incoming_changes (key, revision);
CREATE TABLE raft_kv.incoming_requests (LIKE raft_kv.requests INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.incoming_requests ADD CONSTRAINT incoming_requests_pkey PRIMARY KEY (nonce, seq);
CREATE INDEX incoming_requests_revision ON raft_kv.incoming_requests (revision);
-- What the snapshot tables hold: written by the freeze worker with the copy.
CREATE UNLOGGED TABLE raft_kv.snapshot_meta (
    applied_index    bigint NOT NULL,
    kv_rows          bigint NOT NULL,
    request_rows     bigint NOT NULL,
    conf_state       bytea  NOT NULL,
    members          bytea  NOT NULL,
    change_rows      bigint NOT NULL,
    revision         bigint NOT NULL,
    compact_revision bigint NOT NULL,
    leases           bytea  NOT NULL DEFAULT ''
);

-- A backup being restored (see raft_restore): a superuser loads raft_backup()'s records here
-- with COPY; the worker installs them and empties the table.
CREATE TABLE raft_kv.restore (
    seq    integer PRIMARY KEY,
    record bytea   NOT NULL
);

REVOKE ALL ON raft_kv.leases, raft_kv.restore FROM PUBLIC;
REVOKE ALL ON raft_kv.log, raft_kv.state, raft_kv.kv, raft_kv.requests, raft_kv.members, raft_kv.changes,
    raft_kv.snapshot_kv, raft_kv.snapshot_requests, raft_kv.snapshot_changes, raft_kv.snapshot_meta,
    raft_kv.incoming_kv, raft_kv.incoming_requests, raft_kv.incoming_changes FROM PUBLIC;
REVOKE ALL ON SCHEMA raft_kv FROM PUBLIC;

-- search_path is pinned: the trigger runs as whoever writes, with their search_path.
CREATE FUNCTION raft_kv.reject_direct_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT raft_kv.is_worker() THEN
        RAISE EXCEPTION 'direct % on %.% is not allowed', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'raft_kv tables change only through the Raft log: use raft_set() or raft_delete().';
    END IF;
    RETURN NULL;
END
$$;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['log', 'state', 'kv', 'requests', 'members', 'changes', 'leases',
                             'snapshot_kv', 'snapshot_requests', 'snapshot_changes', 'snapshot_meta',
                             'incoming_kv', 'incoming_requests', 'incoming_changes'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER reject_direct_write BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE '
                       'ON raft_kv.%I FOR EACH STATEMENT EXECUTE FUNCTION raft_kv.reject_direct_write()', t);
    END LOOP;
END
$$;

-- Least privilege: nothing is executable by PUBLIC. Three roles, each including the one
-- before: reader (reads and status), writer (writes), admin (membership, peer addresses).
-- Roles are cluster-wide, so they are created only if missing and survive DROP EXTENSION.
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['raft_kv_reader', 'raft_kv_writer', 'raft_kv_admin'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
GRANT raft_kv_reader TO raft_kv_writer;
GRANT raft_kv_writer TO raft_kv_admin;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA raft_kv FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION raft_get(text, text, bigint), raft_get_kv(text, text, bigint), raft_scan(text, text, bigint),
    raft_changes(bigint, text, integer, text), raft_watch(text, bigint, interval, integer), raft_status(),
    raft_lease_ttl(bigint, text), raft_leases(text),
    raft_lease_grant(interval), raft_lease_keepalive(bigint), raft_lease_revoke(bigint),
    raft_lock(text, bigint, interval), raft_unlock(text, bigint), raft_campaign(text, bigint, text, interval),
    raft_leader(text, text), raft_resign(text, bigint),
    raft_set(text, text, text, bigint), raft_cas(text, text, text, text), raft_delete(text, text),
    raft_cas_rev(text, text, text, text), raft_delete_rev(text, text),
    raft_txn(jsonb, jsonb, jsonb, text), raft_compact(bigint),
    raft_join(bigint, text, boolean), raft_remove(bigint), raft_transfer_leader(bigint),
    raft_members(), raft_stat(), raft_stat_peers(),
    raft_backup(), raft_restore(), raft_force_new_cluster() FROM PUBLIC;

-- The store's revision and history compaction point, for readers (the view runs with its
-- owner's rights; the state row holds more than readers need).
CREATE VIEW raft_kv.revisions AS SELECT revision, compact_revision FROM raft_kv.state WHERE id = 1;
REVOKE ALL ON raft_kv.revisions FROM PUBLIC;

-- Readers read raft_kv.kv and the history with their own rights (the functions are not
-- SECURITY DEFINER).
GRANT USAGE ON SCHEMA raft_kv TO raft_kv_reader;
GRANT SELECT ON raft_kv.kv, raft_kv.changes, raft_kv.revisions, raft_kv.leases TO raft_kv_reader;
GRANT EXECUTE ON FUNCTION raft_get(text, text, bigint), raft_get_kv(text, text, bigint), raft_scan(text, text, bigint),
    raft_changes(bigint, text, integer, text), raft_watch(text, bigint, interval, integer), raft_status(),
    raft_lease_ttl(bigint, text), raft_leases(text), raft_leader(text, text)
    TO raft_kv_reader;
GRANT EXECUTE ON FUNCTION raft_lease_grant(interval), raft_lease_keepalive(bigint), raft_lease_revoke(bigint),
    raft_lock(text, bigint, interval), raft_unlock(text, bigint), raft_campaign(text, bigint, text, interval),
    raft_resign(text, bigint)
    TO raft_kv_writer;
GRANT EXECUTE ON FUNCTION raft_set(text, text, text, bigint), raft_cas(text, text, text, text), raft_delete(text, text),
    raft_cas_rev(text, text, text, text), raft_delete_rev(text, text), raft_txn(jsonb, jsonb, jsonb, text)
    TO raft_kv_writer;
-- Compaction destroys history other clients may still be reading: an administrator's call.
GRANT EXECUTE ON FUNCTION raft_join(bigint, text, boolean), raft_remove(bigint), raft_transfer_leader(bigint),
    raft_members(), raft_compact(bigint) TO raft_kv_admin;
-- Backups read every table of the state machine (not SECURITY DEFINER: with the caller's
-- rights). Restoring and forcing a new cluster are a superuser's (checked in the functions).
GRANT SELECT ON raft_kv.state, raft_kv.requests TO raft_kv_admin;
GRANT EXECUTE ON FUNCTION raft_backup() TO raft_kv_admin;
-- The tables a snapshot is received into have their live twin's rights, so swapping a pair
-- changes no one's (an install whose pairs' rights differ copies the rows instead).
GRANT SELECT ON raft_kv.incoming_kv, raft_kv.incoming_changes TO raft_kv_reader;
GRANT SELECT ON raft_kv.incoming_requests TO raft_kv_admin;
-- Monitoring sees the whole status, peer addresses included, and the members.
GRANT EXECUTE ON FUNCTION raft_status(), raft_members() TO pg_monitor;

-- pg_stat-style views of this node's counters and its view of the peers (see stat_api.rs),
-- for monitoring and administrators.
CREATE VIEW raft_kv.stat AS
    SELECT s.*, pg_catalog.pg_total_relation_size('raft_kv.log') AS log_bytes FROM @extschema@.raft_stat() s;
CREATE VIEW raft_kv.stat_peers AS SELECT * FROM @extschema@.raft_stat_peers();
REVOKE ALL ON raft_kv.stat, raft_kv.stat_peers FROM PUBLIC;
GRANT EXECUTE ON FUNCTION raft_stat(), raft_stat_peers() TO pg_monitor, raft_kv_admin;
GRANT SELECT ON raft_kv.stat, raft_kv.stat_peers TO pg_monitor, raft_kv_admin;
GRANT USAGE ON SCHEMA raft_kv TO pg_monitor;
