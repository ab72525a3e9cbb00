"""Development tooling of this repository, not part of the installed package.

- :mod:`devstack.stack`: Mosquitto, Redis, a MongoDB-wire server and RabbitMQ
  as child processes on loopback, for the tests, the benchmarks and ``make run``;
- :mod:`devstack.ports`: free ports, waiting for one to open, and who holds a
  taken one;
- :mod:`devstack.lifetime`: children that do not outlive the process that
  started them;
- :mod:`devstack.run`: ``make run``, the whole pipeline in the foreground.

It reads the repository's files (``config/``, ``.cache/bin/ferretdb``) through
:data:`REPO` and needs the ``test`` extra (``tomli-w``); ``setup.cfg`` installs
``sensor_gateway*`` only, so none of this ships with the product.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
