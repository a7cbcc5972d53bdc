"""VM-to-VM links (issue 10): a byte stream between two sandboxes, sealed end to end.

The daemon's :class:`LinkManager` (``manager.links``, :mod:`warden.links.manager`) makes,
lists and removes links. A link's records go through a shared-memory ring that the two VMs
map (:mod:`warden.vmm.linkslots`, the default) or are relayed by the daemon between the two
agents (:mod:`warden.links.relay`). See docs/design.md ("Links") and docs/security.md
("VM-to-VM links").
"""

from warden.links.manager import TRANSPORTS, LinkInfo, LinkManager, Transport, check_link_name

__all__ = ["TRANSPORTS", "LinkInfo", "LinkManager", "Transport", "check_link_name"]
