"""Pure virtio data structures: guest memory, split and packed virtqueues, chain walking, the packet
pool and a driver-side model of the guest.

Nothing in this package does I/O: it imports no ``asyncio``, ``socket``, ``os`` or ``mmap`` (a test
enforces this). Callers hand in buffers and get back numpy views, indices and events.
"""
