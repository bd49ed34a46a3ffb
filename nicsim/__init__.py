"""nicsim: a user-space NIC for QEMU guests.

The vhost-user backend of a guest's virtio-net device, with every in-flight guest buffer tracked by a
descriptor from a numpy-backed packet pool (``rings.pool``).
"""

__version__ = "0.1.0"
