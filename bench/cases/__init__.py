"""One module per measured case: crud, pgbench, live (with the bare Redis round trip),
catchup and storm. Each returns plain dicts that go into bench/results.json as they are."""
