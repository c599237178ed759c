"""The one exception hierarchy of xdpoib.

Every error the project raises on purpose is an `XdpoibError`; `cli.main` catches it once and prints
its message on one line. Each cause has its own subclass so callers and tests can tell them apart.
"""

from __future__ import annotations


class XdpoibError(Exception):
    """Base of every deliberate xdpoib error: the message is one line meant for a user."""


class UsageError(XdpoibError):
    """Bad command-line input, refused before anything changed."""


class PrerequisiteError(XdpoibError):
    """Something the machine must provide (root, a package, a kernel feature) is missing."""


class FrameError(XdpoibError):
    """A frame the translator cannot handle: malformed, unsupported or not allowed.

    `reason` is a `xdpoib.reasons.DropReason`: the same number the BPF datapath counts the drop under.
    """

    def __init__(self, reason, detail: str = ""):
        self.reason = reason
        self.detail = detail
        name = getattr(reason, "name", str(reason)).lower()
        super().__init__(f"{name}: {detail}" if detail else name)


class AddressError(XdpoibError, ValueError):
    """A textual or binary address (MAC, GID, IPoIB hardware address, P_Key) that cannot be parsed."""
