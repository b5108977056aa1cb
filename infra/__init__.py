"""The deployment shapes (infra/kuberay, infra/ray-up, infra/Dockerfile) and the local cluster
(:mod:`infra.cluster`). A package so that the tests and import-linter see ``infra.cluster``; the two entry
scripts, ``infra/local_cluster.py`` and ``infra/cluster_params.py``, also run by path."""
