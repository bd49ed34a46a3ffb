"""Build a small bootable guest (Debian cloud kernel + busybox initramfs + iperf3) into a cache."""
