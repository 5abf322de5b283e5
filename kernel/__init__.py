"""txkernel: interactive parallel computing for Python on Twisted.

Layers, top to bottom: clients (:mod:`kernel.client`), network adapters
(``*fc``, ``*pb``, native), the core services (engines, controller,
multiengine, tasks) and task storage (:mod:`kernel.taskdb`).
"""

__version__ = "0.1.0.dev0"
