"""The daemon's HTTP contract, shared by the server, the SDK and the CLI.

``api/errors.py`` declares the error answers once: which error is which status, and the body
both ways. The request and response models are ``server/models.py`` (pydantic, server side);
the exec output stream's records are ``warden.records``.
"""
