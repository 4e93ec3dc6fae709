"""``tfft sweep``: a Ray Tune sweep over any config keys from one shared base bank.

    run        the sweep: shared base stage, the Tune run, skipping finished trials, the parent MLflow run
    spec       the sweep file -> named, validated trials (``load_sweep``)
    section    the ``sweep:`` section itself, parsed and checked (``SweepConfig``)
    trial      one trial in its Tune process: the run's stages from the shared base bank, reports to Tune
    resources  trials at once and each trial's CPUs/GPUs from the cluster
    scheduler  ASHA on an intermediate training metric
    tracking   MLflow writes that retry on a busy store (``RetryingRun``)

Importing the package imports none of them (a spawned process that needs only ``tracking`` stays light).
"""

__all__: list[str] = []
