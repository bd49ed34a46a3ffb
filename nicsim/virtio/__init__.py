"""The virtio-net device, I/O-free (virtio 1.2 §5.1): queue lifecycle, the TX and RX data paths, the
notification policy and the stats. Nothing here touches a socket, an fd or an event loop."""
