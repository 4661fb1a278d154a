-- raft_kv 0.1.0 -> 0.2.0: leases, locks and elections; monitoring; backup and disaster recovery;
-- lz4 compression of values and log entries. Run by ALTER EXTENSION raft_kv UPDATE, on each node
-- in turn after its server runs the 0.2.0 library (see the README, "Upgrading"). 0.1.0 is the
-- schema of commit 404003e. tests/tests/upgrade.rs checks that the result equals a fresh 0.2.0
-- install, object by object.

\echo Use "ALTER EXTENSION raft_kv UPDATE TO '0.2.0'" to load this file. \quit

-- raft_set gained its lease argument: a new signature, so the old function goes (with the
-- grants on it, which are made again below).
DROP FUNCTION raft_set(text, text, text);
CREATE  FUNCTION "raft_set"(
	"key" TEXT, /* Option < & str > */
	"value" TEXT, /* Option < & str > */
	"request_id" TEXT DEFAULT NULL, /* Option < & str > */
	"lease" bigint DEFAULT NULL /* Option < i64 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_set_wrapper';

-- raft_get and the writes no longer pin their search_path (a GUC save and restore on every
-- call): raft_get schema-qualifies everything it runs, the writes run no SQL in the session.
ALTER FUNCTION raft_get(text, text, bigint) RESET search_path;
ALTER FUNCTION raft_cas(text, text, text, text) RESET search_path;
ALTER FUNCTION raft_cas_rev(text, text, text, text) RESET search_path;
ALTER FUNCTION raft_delete(text, text) RESET search_path;
ALTER FUNCTION raft_delete_rev(text, text) RESET search_path;

-- raft_members shows each member's version: a new row type, so likewise.
DROP FUNCTION raft_members();
CREATE  FUNCTION "raft_members"() RETURNS TABLE (
	"id" bigint,  /* i64 */
	"address" TEXT,  /* Option < String > */
	"voter" bool,  /* bool */
	"match_index" bigint,  /* Option < i64 > */
	"active" bool,  /* Option < bool > */
	"version" TEXT,  /* Option < String > */
	"log_format" INT  /* Option < i32 > */
)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_members_wrapper';

CREATE  FUNCTION "raft_backup"() RETURNS TABLE (
	"seq" INT,  /* i32 */
	"record" bytea  /* Vec < u8 > */
)
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_backup_wrapper';

CREATE  FUNCTION "raft_campaign"(
	"election" TEXT, /* Option < & str > */
	"lease" bigint, /* Option < i64 > */
	"value" TEXT, /* Option < & str > */
	"wait" interval DEFAULT NULL /* Option < Interval > */
) RETURNS bigint /* Option < i64 > */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_campaign_wrapper';

CREATE  FUNCTION "raft_force_new_cluster"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_force_new_cluster_wrapper';

CREATE  FUNCTION "raft_leader"(
	"election" TEXT, /* Option < & str > */
	"consistency" TEXT DEFAULT 'linearizable' /* Option < & str > */
) RETURNS TABLE (
	"value" TEXT,  /* String */
	"revision" bigint,  /* i64 */
	"key" TEXT  /* String */
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_leader_wrapper';

CREATE  FUNCTION "raft_lease_grant"(
	"ttl" interval /* Option < Interval > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_lease_grant_wrapper';

CREATE  FUNCTION "raft_lease_keepalive"(
	"id" bigint /* Option < i64 > */
) RETURNS interval /* Interval */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_lease_keepalive_wrapper';

CREATE  FUNCTION "raft_lease_revoke"(
	"id" bigint /* Option < i64 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_lease_revoke_wrapper';

CREATE  FUNCTION "raft_lease_ttl"(
	"id" bigint, /* Option < i64 > */
	"consistency" TEXT DEFAULT 'linearizable' /* Option < & str > */
) RETURNS TABLE (
	"id" bigint,  /* i64 */
	"granted_ttl" interval,  /* Interval */
	"remaining_ttl" interval,  /* Interval */
	"keys" TEXT[]  /* Vec < String > */
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_lease_ttl_wrapper';

CREATE  FUNCTION "raft_leases"(
	"consistency" TEXT DEFAULT 'linearizable' /* Option < & str > */
) RETURNS TABLE (
	"id" bigint,  /* i64 */
	"granted_ttl" interval,  /* Interval */
	"remaining_ttl" interval,  /* Interval */
	"keys" bigint  /* i64 */
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_leases_wrapper';

CREATE  FUNCTION "raft_lock"(
	"name" TEXT, /* Option < & str > */
	"lease" bigint, /* Option < i64 > */
	"wait" interval DEFAULT NULL /* Option < Interval > */
) RETURNS bigint /* Option < i64 > */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_lock_wrapper';

CREATE  FUNCTION "raft_resign"(
	"election" TEXT, /* Option < & str > */
	"lease" bigint /* Option < i64 > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_resign_wrapper';

CREATE  FUNCTION "raft_restore"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_restore_wrapper';

CREATE  FUNCTION "raft_stat"() RETURNS TABLE (
	"node_id" bigint,  /* i64 */
	"role" TEXT,  /* String */
	"term" bigint,  /* i64 */
	"leader_id" bigint,  /* i64 */
	"elections_started" bigint,  /* i64 */
	"elections_won" bigint,  /* i64 */
	"leader_changes" bigint,  /* i64 */
	"proposals" bigint,  /* i64 */
	"forwarded" bigint,  /* i64 */
	"commit_index" bigint,  /* i64 */
	"applied_index" bigint,  /* i64 */
	"applied_entries" bigint,  /* i64 */
	"deferred_applies" bigint,  /* i64 */
	"apply_lag" bigint,  /* i64 */
	"log_entries" bigint,  /* i64 */
	"read_index_requests" bigint,  /* i64 */
	"read_index_failures" bigint,  /* i64 */
	"snapshots_sent" bigint,  /* i64 */
	"snapshots_received" bigint,  /* i64 */
	"snapshots_failed" bigint,  /* i64 */
	"snapshot_bytes_sent" bigint,  /* i64 */
	"snapshot_bytes_received" bigint,  /* i64 */
	"dropped_inbound" bigint,  /* i64 */
	"dropped_outbound" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_stat_wrapper';

CREATE  FUNCTION "raft_stat_peers"() RETURNS TABLE (
	"peer_id" bigint,  /* i64 */
	"address" TEXT,  /* String */
	"voter" bool,  /* bool */
	"connected" bool,  /* bool */
	"last_contact_age" interval,  /* Option < Interval > */
	"match_index" bigint  /* Option < i64 > */
)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_stat_peers_wrapper';

CREATE  FUNCTION "raft_unlock"(
	"name" TEXT, /* Option < & str > */
	"lease" bigint /* Option < i64 > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'raft_unlock_wrapper';

-- Keys attached to leases, and the leases.
ALTER TABLE raft_kv.kv ADD COLUMN lease bigint NOT NULL DEFAULT 0;
CREATE INDEX kv_lease ON raft_kv.kv (lease) WHERE lease <> 0;
CREATE TABLE raft_kv.leases (
    id        bigint PRIMARY KEY,
    ttl_ms    bigint NOT NULL,
    refreshes bigint NOT NULL
);
ALTER TABLE raft_kv.snapshot_kv ADD COLUMN lease bigint NOT NULL DEFAULT 0;
-- The snapshot tables keep only their primary keys (chunks are read by them).
DROP INDEX raft_kv.snapshot_changes_key_revision_idx, raft_kv.snapshot_requests_revision_idx;
ALTER TABLE raft_kv.snapshot_meta ADD COLUMN leases bytea NOT NULL DEFAULT '';

-- lz4 where the server has it (as a fresh install does); existing rows keep their compression.
DO $$
BEGIN
    ALTER TABLE raft_kv.log ALTER COLUMN data SET COMPRESSION lz4;
    ALTER TABLE raft_kv.kv ALTER COLUMN value SET COMPRESSION lz4;
    ALTER TABLE raft_kv.changes ALTER COLUMN value SET COMPRESSION lz4,
                                ALTER COLUMN prev_value SET COMPRESSION lz4;
    ALTER TABLE raft_kv.snapshot_kv ALTER COLUMN value SET COMPRESSION lz4;
    ALTER TABLE raft_kv.snapshot_changes ALTER COLUMN value SET COMPRESSION lz4,
                                         ALTER COLUMN prev_value SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;
END
$$;

-- The tables a received snapshot is staged into, swapped with the live ones on install.
CREATE TABLE raft_kv.incoming_kv (LIKE raft_kv.kv INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.incoming_kv ADD CONSTRAINT incoming_kv_pkey PRIMARY KEY (key);
CREATE INDEX incoming_kv_lease ON raft_kv.incoming_kv (lease) WHERE lease <> 0;
CREATE TABLE raft_kv.incoming_changes (LIKE raft_kv.changes INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.incoming_changes ADD CONSTRAINT incoming_changes_pkey PRIMARY KEY (revision, key);
CREATE INDEX incoming_changes_key ON raft_kv.incoming_changes (key, revision);
CREATE TABLE raft_kv.incoming_requests (LIKE raft_kv.requests INCLUDING ALL EXCLUDING INDEXES);
ALTER TABLE raft_kv.incoming_requests ADD CONSTRAINT incoming_requests_pkey PRIMARY KEY (nonce, seq);
CREATE INDEX incoming_requests_revision ON raft_kv.incoming_requests (revision);
REVOKE ALL ON raft_kv.incoming_kv, raft_kv.incoming_requests, raft_kv.incoming_changes FROM PUBLIC;
CREATE TRIGGER reject_direct_write BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON raft_kv.incoming_kv
    FOR EACH STATEMENT EXECUTE FUNCTION raft_kv.reject_direct_write();
CREATE TRIGGER reject_direct_write BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON raft_kv.incoming_requests
    FOR EACH STATEMENT EXECUTE FUNCTION raft_kv.reject_direct_write();
CREATE TRIGGER reject_direct_write BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON raft_kv.incoming_changes
    FOR EACH STATEMENT EXECUTE FUNCTION raft_kv.reject_direct_write();

-- A backup being restored (see raft_restore).
CREATE TABLE raft_kv.restore (
    seq    integer PRIMARY KEY,
    record bytea   NOT NULL
);

REVOKE ALL ON raft_kv.leases, raft_kv.restore FROM PUBLIC;
CREATE TRIGGER reject_direct_write BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON raft_kv.leases
    FOR EACH STATEMENT EXECUTE FUNCTION raft_kv.reject_direct_write();

REVOKE EXECUTE ON FUNCTION raft_lease_ttl(bigint, text), raft_leases(text),
    raft_lease_grant(interval), raft_lease_keepalive(bigint), raft_lease_revoke(bigint),
    raft_lock(text, bigint, interval), raft_unlock(text, bigint), raft_campaign(text, bigint, text, interval),
    raft_leader(text, text), raft_resign(text, bigint), raft_set(text, text, text, bigint),
    raft_stat(), raft_stat_peers(), raft_backup(), raft_restore(), raft_force_new_cluster(), raft_members()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION raft_members() TO raft_kv_admin, pg_monitor;
GRANT SELECT ON raft_kv.leases TO raft_kv_reader;
GRANT EXECUTE ON FUNCTION raft_lease_ttl(bigint, text), raft_leases(text), raft_leader(text, text)
    TO raft_kv_reader;
GRANT EXECUTE ON FUNCTION raft_lease_grant(interval), raft_lease_keepalive(bigint), raft_lease_revoke(bigint),
    raft_lock(text, bigint, interval), raft_unlock(text, bigint), raft_campaign(text, bigint, text, interval),
    raft_resign(text, bigint), raft_set(text, text, text, bigint)
    TO raft_kv_writer;
GRANT SELECT ON raft_kv.state, raft_kv.requests TO raft_kv_admin;
GRANT SELECT ON raft_kv.incoming_kv, raft_kv.incoming_changes TO raft_kv_reader;
GRANT SELECT ON raft_kv.incoming_requests TO raft_kv_admin;
GRANT EXECUTE ON FUNCTION raft_backup() TO raft_kv_admin;

CREATE VIEW raft_kv.stat AS
    SELECT s.*, pg_catalog.pg_total_relation_size('raft_kv.log') AS log_bytes FROM @extschema@.raft_stat() s;
CREATE VIEW raft_kv.stat_peers AS SELECT * FROM @extschema@.raft_stat_peers();
REVOKE ALL ON raft_kv.stat, raft_kv.stat_peers FROM PUBLIC;
GRANT EXECUTE ON FUNCTION raft_stat(), raft_stat_peers() TO pg_monitor, raft_kv_admin;
GRANT SELECT ON raft_kv.stat, raft_kv.stat_peers TO pg_monitor, raft_kv_admin;
GRANT USAGE ON SCHEMA raft_kv TO pg_monitor;
