\set k random(1, 10000)
SELECT raft_set('bench/' || :k, 'value-' || :k);
