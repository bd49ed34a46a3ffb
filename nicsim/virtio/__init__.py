"""The virtio-net device, I/O-free (virtio 1.2 §5.1): the device and its queue lifecycle (``device``),
the TX path (``tx``), the RX path (``rx``), the state both paths share (``queues``), the feature bits
(``features``), the port interface it calls (``port``) and the inflight hooks (``inflight``), the
notification policy and the stats. Nothing here touches a socket, an fd or an event loop, and nothing
here imports a layer above it (ports, vhost, server)."""
