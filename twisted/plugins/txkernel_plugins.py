"""twistd plugins for txkernel: ``twistd -n txkernel-controller`` and
``twistd -n txkernel-engine``.

Only lazy ServiceMakers live here (no heavy imports, never the reactor); the
options and services are in :mod:`kernel.tap`.
"""

from twisted.application.service import ServiceMaker

txkernel_controller = ServiceMaker(
    "txkernel controller",
    "kernel.tap.controller",
    "A txkernel controller: engine registry, multiengine and task interfaces.",
    "txkernel-controller",
)

txkernel_engine = ServiceMaker(
    "txkernel engine",
    "kernel.tap.engine",
    "A txkernel engine that registers with a controller.",
    "txkernel-engine",
)
