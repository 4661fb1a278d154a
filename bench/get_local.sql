\set k random(1, 10000)
SELECT raft_get('bench/' || :k, 'local');
