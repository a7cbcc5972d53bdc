"""VM-to-VM links (issue 10): a byte stream between two sandboxes, sealed end to end.

The daemon's :class:`LinkManager` (``manager.links``) makes, lists and removes links, and
relays each one's records between the two agents (:mod:`warden.links.relay`). See
docs/design.md ("Links") and docs/security.md ("VM-to-VM links").
"""

from warden.links.relay import LinkInfo, LinkManager, check_link_name

__all__ = ["LinkInfo", "LinkManager", "check_link_name"]
