"""TorchX components for the multi-node test: trec's own ``train`` and ``export`` components with
the c10d rendezvous on a port the test chose.

For a job of several nodes, ``launchers/components.py`` (through TorchX's ``dist.ddp``) puts the
rendezvous on ``$TORCHX_RANK0_HOST:29500``, which local_cwd sets to ``localhost``. On a cluster
each node is a host of its own; two "nodes" on one host in a test need a port no one else holds
(another torchrun, a second test run). Only that port changes: the command line, the
environment and the launcher (trec.launch under torchrun) are the components' own.

Usage: ``torchx run -s local_cwd tests/workers/multinode.py:train -j 2x1 --rdzv_port PORT -- ARGS``
"""

import torchx.specs as specs

from launchers import components

_DEFAULT_ENDPOINT = ":29500 "  # dist.ddp's rdzv_port default, as it appears in the torchrun command line


def _rendezvous_on(app: specs.AppDef, rdzv_port: int) -> specs.AppDef:
    role = app.roles[0]
    shell, script = role.args
    if script.count(_DEFAULT_ENDPOINT) != 1:
        raise RuntimeError(f"no single rendezvous endpoint on port 29500 in the component's command: {script[:200]}")
    role.args = [shell, script.replace(_DEFAULT_ENDPOINT, f":{rdzv_port} ")]
    role.port_map["c10d"] = rdzv_port
    return app


def train(*args: str, j: str = "2x1", rdzv_port: int = 29500, cpu: int = 1) -> specs.AppDef:
    """trec's ``train`` component (launchers/components.py) with its rendezvous on ``rdzv_port``.

    Args:
        args: arguments of ``trec train``
        j: ``{nnodes}x{nproc_per_node}``
        rdzv_port: port of the c10d rendezvous store on the first node (``localhost`` under local_cwd)
        cpu: CPUs per node (each rank gets ``cpu / nproc_per_node`` OpenMP threads)
    """
    return _rendezvous_on(components.train(*args, j=j, cpu=cpu), rdzv_port)


def export(*args: str, j: str = "2x1", rdzv_port: int = 29500, cpu: int = 1) -> specs.AppDef:
    """trec's ``export`` component (launchers/components.py) with its rendezvous on ``rdzv_port``.

    Args:
        args: arguments of ``trec export``
        j: ``{nnodes}x{nproc_per_node}``
        rdzv_port: port of the c10d rendezvous store on the first node (``localhost`` under local_cwd)
        cpu: CPUs per node (each rank gets ``cpu / nproc_per_node`` OpenMP threads)
    """
    return _rendezvous_on(components.export(*args, j=j, cpu=cpu), rdzv_port)
