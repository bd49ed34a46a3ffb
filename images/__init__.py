"""The nicsim guest image: a Debian cloud kernel + busybox initramfs with iperf3, built into a cache.

``images.build.build_image()`` returns the kernel and initramfs paths (building them from Debian
packages on first use); ``images/init.sh`` is the guest's ``/init``, which runs the workloads named on
the kernel command line and prints ``NICSIM-RESULT`` lines. This package imports nothing of nicsim's.
"""
