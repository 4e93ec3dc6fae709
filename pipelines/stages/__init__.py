"""The stages of ``tfft run``, in the order `pipelines.run` chains them, each returning a frozen result:

    preflight   config                 -> the solver ("adjoint" | "weighted"), before Ray starts   (preflight)
    base        config, base model     -> BaseStage(model, bank): the base bank                    (base)
    threshold   base bank              -> ThresholdStage(threshold, objective): eta*                (threshold)
    train       base, objective        -> TrainStage(state, objective, refinement): fine-tuning    (train)
    evaluate    base, fine-tuned state -> the final Bank, after the guard's evaluation check        (evaluate)
    record      banks, objective       -> summary.json's dict, MLflow metrics, plots              (record)

The base model itself comes from `pipelines.pretrain.load_or_pretrain` (a frozen `BaseModel`). Each stage leaves
its result in the output directory, and a rerun reuses it.
"""

__all__: list[str] = []
