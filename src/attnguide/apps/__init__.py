"""Applications built on the engine and the pipelines: the CLI, the demo, evaluation, benchmarks and
training. They import the layers below them and each other's public names only.

Importing this package asks OpenMP for passive waits (``OMP_WAIT_POLICY=PASSIVE``, unless the
environment already says otherwise), before the commands start torch: torch's default waiting threads
spin, and on a machine whose cores are shared with other work (a 2-core laptop running something else)
spinning threads made ``attnguide sample`` 7x slower, where passive ones slow it in proportion to the
load. It takes effect only where torch's thread pool has not started yet (a command, not a notebook that
imported torch first).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
