"""Helpers shared by the test suite and the benchmarks (not shipped in any image).

- ``examples``: the repository's paths and example CRs;
- ``procs``: real processes on loopback (sdserve, redis-server, the operator) and free ports;
- ``apiserver``: the test Kubernetes API server the operator runs against (refuses what
  kube-apiserver refuses);
- ``waiting``: ``eventually``, the one way tests wait for another process or thread;
- ``fakes``: a pipeline that draws images without a model, for fast in-process API tests.

Both ``tests/`` (pytest's ``pythonpath``) and ``bench/`` put ``testing/`` on ``sys.path``.
"""
