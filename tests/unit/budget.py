"""How hard the machine tests on bytes try: ``FEW`` hypothesis examples per test, no
deadline (a loaded machine is slow, not wrong), and big drawn data allowed."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

FEW = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
