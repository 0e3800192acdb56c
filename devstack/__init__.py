"""Dev-only: ``make run``'s supervisor and the embedded nats-server and Postgres it starts.

Neither the wheel nor the image carries this package (pyproject.toml, Dockerfile): a cluster
brings its own NATS and Postgres. ``cascade-gateway dev`` imports it from the repository
checkout, which ``uv sync``'s editable install puts on ``sys.path``; elsewhere the command
says so and stops. The test suite and the benchmarks start their servers with
:mod:`devstack.embedded` too.
"""
