"""The agent channel's cryptography: a Noise handshake, then encrypted, authenticated records.

This is the core of the encrypted agent channel (issue 7, item 1), as pure code with no I/O
that both the host and the guest agent run (it is stdlib plus ``cryptography``, and uses only
what Debian 12's ``python3-cryptography`` 38 has):

- :mod:`.noise`: the Noise Protocol Framework, revision 34, for
  ``Noise_NNpsk0_25519_ChaChaPoly_SHA256``, checked against published test vectors;
- :mod:`.transport`: the handshake on the wire (with a version) and the records after it;
- :mod:`.errors`: :class:`ChannelError`, the one exception for everything a peer can cause.

Why ``NNpsk0`` (``-> psk, e`` / ``<- e, ee``): both sides of a VM's channel already share a
secret, the per-VM 256-bit key, and nothing else. The psk, mixed in before the first message,
gives mutual authentication: only a holder of the key can produce either side's message, so
no static key pairs or certificates are needed. The two ephemeral X25519 keys give every
session its own keys (two sessions with one psk never share keys) and forward secrecy: a
recorded session stays secret even if the psk leaks later. ChaCha20-Poly1305 is fast without
AES instructions (TCG guests) and SHA-256 is in both sides' standard library.

Where it is used: :mod:`warden.agent.secure` (the host), :mod:`warden.guest.agent` (the
guest agent), :mod:`.window` (tags for the transfer window's pieces), and
:mod:`warden.vmm.channel_keys` (each VM's secret). ``docs/security.md``, "The agent channel",
describes the whole. Not done: rekey within a session (Noise section 11.3:
``CipherState.rekey`` exists, the records do not use it).
"""
