"""Running fedprune as a real federation: processes on one machine, TLS, node keys, containers.

* :mod:`deploy.launch` starts a SuperLink and N SuperNodes as processes on 127.0.0.1 (each with its
  own Flower home and node config), submits an experiment with ``flwr run``, reports the run's
  status from ``flwr ls`` and stops what it started (``python -m deploy.launch --help``);
* :mod:`deploy.certs` makes a CA, a SuperLink certificate and one key pair per SuperNode
  (``python -m deploy.certs --help``), for the launcher's secure mode and for docker-compose.

docs/deployment.md has the walk-through; docker-compose.yml and docker-compose.tls.yml at the top
level are the container version of the same federation.
"""
