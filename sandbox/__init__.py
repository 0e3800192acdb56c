"""Simulators for development, tests and non-production stacks: a cascade-core ledger that
checks the money invariants (``core``), sandbox providers with scripted behaviours
(``providers``) and traffic scenarios (``scenarios``). Never in the wheel or the image, and
imported only when ``SANDBOX_ENABLED`` is true, which production refuses."""
