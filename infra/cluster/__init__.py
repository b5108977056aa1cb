"""A real multi-node Ray cluster on one machine (``infra/local-cluster.sh``), one module per concern:

========================  =====================================================================
``layout``                settings, the state folder and its state file, the hosts' addresses
``credentials``           the team deployment's generated secrets (0600 files, redaction)
``hosts``                 hosts of their own: network namespaces, a bridge, partition/heal
``processes``             start a marked process, find this cluster's processes, stop them
``environment``           the environment of clients (env.sh) and of the cluster's processes
``services``              what the services share: start one, wait for its port
``ray_nodes``             ``ray start`` of the head and workers, Ray's state API
``mlflow_server``         the tracking server (SQLite, or PostgreSQL + basic-auth + the bucket)
``s3_endpoint``           the S3 endpoint (moto's server), the bucket saved/restored across restarts
``postgres``              the private PostgreSQL
``status``                what `status` reports, as a dict and as text
``operator``              :class:`LocalCluster`: up, down, restart-node, restore, partition, logs
``cli``                   the command line
========================  =====================================================================

The layers (each imports only those below it) are checked by import-linter (pyproject.toml).
"""

from infra.cluster.layout import ClusterError, ClusterSettings, parse_bytes, port_in_use
from infra.cluster.operator import LocalCluster

__all__ = ["ClusterError", "ClusterSettings", "LocalCluster", "parse_bytes", "port_in_use"]
