"""Network-namespace lab: a small routed internet with NATs, for hole-punching tests.

Stdlib only. See :mod:`tests.lab.topology` for the topology and API,
:mod:`tests.lab.delayer` for the NFQUEUE delay/loss emulator,
``python -m tests.lab --help`` for the command line and
:mod:`tests.lab.fixtures` for the pytest integration.
"""

# The lab's API is topology's: the names it lists in its ``__all__``.
from tests.lab.topology import *  # noqa: F403
from tests.lab.topology import __all__ as __all__
