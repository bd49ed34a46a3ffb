"""Launch and drive QEMU test guests (``qemu.testvm``), beside ``qemu.qmp`` in the ``qemu`` namespace.

``qemu/`` itself has no ``__init__.py`` on purpose: ``qemu.qmp`` is a namespace package, and an
``__init__.py`` here would shadow it (STYLE.md, "One trap in the layout").
"""
