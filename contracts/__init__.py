"""Every wire format as msgspec Structs and exact encoders, and nothing else (no I/O, no
framework): the frozen legacy v1 API (``legacy``), the provider protocol (``provider``),
provider webhooks (``webhooks``), the providers file (``providers_file``) and the bus
messages between the gateway and the workers (``messages``)."""
