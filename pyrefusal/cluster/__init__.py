"""Studies spread over a Ray cluster (``--ray``): model replicas as Ray actors running the stages' units.

* :mod:`~pyrefusal.cluster.pool`: :class:`ClusterSpec`, :class:`RayShards` (the Ray
  :class:`~pyrefusal.stages.shards.Shards` executor), :class:`ModelWorker` (one replica), :func:`require_ray`.

Nothing here is imported unless a study is given a :class:`ClusterSpec`; Ray itself is imported only then.
"""
