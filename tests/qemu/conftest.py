"""The qemu tier: the host side boots a guest; `guest/` runs inside it and is never collected here."""

collect_ignore = ["guest"]
