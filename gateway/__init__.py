"""The HTTP process and the command line.

``app`` builds the Litestar application (the legacy v1 API in ``api``, the provider webhook
intake in ``webhooks``, the ops API in ``ops``, health and metrics); the handlers parse, call
the application service (``service``) and encode. ``cli`` is the ``cascade-gateway`` command
(serve, worker, migrate, report, dlq, ...); ``runtime`` opens the connections every process
shares; ``settings`` reads the environment.
"""
