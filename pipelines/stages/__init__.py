"""The stages of ``tfft run``, in the order `pipelines.run` chains them, each returning a frozen result:

    preflight   config                 -> the solver ("adjoint" | "weighted"), before Ray starts   (preflight)
    base        config, base model     -> BaseStage(model, bank, record): the base bank            (base)
    threshold   base bank              -> ThresholdStage(threshold, objective): eta*                (threshold)
    train       base, objective        -> TrainStage(state, objective, record, refinement)         (train)
    evaluate    base, fine-tuned state -> EvaluateStage(bank, record): the final bank, after the    (evaluate)
                                          guard's evaluation check
    record      banks, objective       -> summary.json's dict, MLflow metrics, plots              (record)

The base model itself comes from `pipelines.pretrain.load_or_pretrain` (a frozen `BaseModel`). Each stage leaves
its result in the output directory, and a rerun reuses it; each result's ``record`` (a
`pipelines.stage_record.StageRecord`) says whether this call built, reused or resumed it, and
`pipelines.run.run_from_bank` collects them in ``summary.json["stages"]``.
"""

__all__: list[str] = []
