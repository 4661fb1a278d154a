\set k random(1, 10000)
INSERT INTO bench_plain_kv (key, value) VALUES ('bench/' || :k, 'value-' || :k)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
