"""The warden guest agent: PID 1 inside the microVM.

It runs as ``python3 -E -s -S /usr/lib/warden/agent_main.py`` and serves exec, file and info
requests from the host over the virtio-serial port named ``org.warden.agent.0``, speaking the
framing of :mod:`warden.wire.frame` and the names of :mod:`warden.wire.ops`.

Constraints that shape this package:

* Standard library only, and nothing from warden but :mod:`warden.wire` and
  :mod:`warden.channel` (a unit test imports it with only the stdlib and these files on the
  path). The channel needs ``cryptography``: Debian's python3-cryptography, from
  ``/usr/lib/python3/dist-packages``, which the agent adds to its path (it runs with ``-S``).
* Every connection is the encrypted channel (:mod:`warden.channel.transport`), with the VM's
  secret read from fw_cfg at boot (:mod:`.pid1`); :mod:`.agent` hunts for the host's
  handshake, and :mod:`.writer` seals every frame.
* Python in the guest runs under TCG, about 7x slower than on the host: no asyncio, no typing
  or enum-heavy imports at start (``subprocess``, ``ctypes``, ``shutil`` load lazily), threads
  and os-level I/O. This ``__init__`` imports nothing.
* As PID 1 it inherits every orphan, so one reaper thread (:mod:`.reaper`) collects every exit
  status and hands it to the exec that waits for that pid. ``subprocess.Popen`` only spawns.
* The workload is hostile. Commands and file operations run as the unprivileged ``user``
  (uid 1000) unless a request asks for root (:mod:`.users`); the agent's port, disks and
  console are root-only and the agent is not dumpable (:mod:`.pid1`).

Modules: :mod:`.pid1` (boot and ``main``), :mod:`.agent` (serving a connection),
:mod:`.session` (one host's session: HELLO, dispatch), :mod:`.exec` / :mod:`.spawn` /
:mod:`.pump` / :mod:`.stdin` (commands), :mod:`.files` / :mod:`.fileread` / :mod:`.filewrite`
(files), :mod:`.xfer` (the transfer window), :mod:`.flow` (WINDOW credit), :mod:`.users`,
:mod:`.reaper`, :mod:`.writer`, :mod:`.args`, :mod:`.log`, :mod:`.openssl` (set before anything
loads libcrypto).

Threads: the main thread reads and decodes the port and handles quick requests inline; each
``exec`` gets a thread that pumps stdout/stderr (plus a stdin thread if it takes stdin); each
file ``read`` gets a thread; file ``write`` data is written by the main thread. Whole frames are
written to the port under one lock.

For tests, ``python -m warden.guest --fd N`` serves one connection on an open fd (a socketpair
end) and exits at its EOF; ``--listen PATH`` serves connections on a unix socket one after
another, which exercises the same reset-on-disconnect path as the virtio port. Either takes
``--user-home DIR``: the home of ``user`` on a host that has no ``/home/user``, and
``--secret-file FILE``: the channel secret (without it, such a local agent speaks plaintext
frames; in a VM the agent always needs its secret, unless the host booted it with
``warden.channel=plain`` for a benchmark).
"""
