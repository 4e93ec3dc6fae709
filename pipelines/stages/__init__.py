"""The stages of ``tfft run``, in the order `pipelines.run` chains them, each returning a frozen result:

    preflight   config                 -> RunPlan(solver "adjoint" | "weighted"), before Ray starts (preflight)
    base        config, base model     -> BaseStage(model, bank, record): the base bank            (base)
    threshold   base bank              -> ThresholdStage(threshold, tilt): eta* and the Tilt        (threshold)
    train       base, tilt, plan       -> TrainStage(state, tilt, record, refinement): fine-tuning  (train)
    evaluate    base, fine-tuned state -> EvaluateStage(bank, record): the final bank, after the    (evaluate)
                                          guard's evaluation check
    record      banks, tilt            -> summary.json's dict, MLflow metrics, plots              (record)

The objective travels as one `tfft.objective.Tilt` (built by the threshold stage), the
solver as preflight's `RunPlan`: what uses the objective (pseudo-reward, tilt weights, target statistics, the
evaluation check, refinement) reads the Tilt, and nothing reads ``finetune.solver`` after preflight. The train
stage turns both into one typed `pipelines.finetune_job.FinetuneJob` (the ``finetune`` section, the Tilt, and the
bank's tilt-weighted rows when the plan's solver is weighted), which reaches every training worker unchanged. Banks with
``reward.screen`` certify their tail at the config's side and alpha (`pipelines.screening`), before any threshold
exists.

The base model itself comes from `pipelines.pretrain.load_or_pretrain` (a frozen `BaseModel`). Each stage leaves
its result in the output directory, and a rerun reuses it; each result's ``record`` (a
`pipelines.stage_record.StageRecord`) says whether this call built, reused or resumed it, and
`pipelines.run.run_from_bank` collects them in ``summary.json["stages"]``.
"""

__all__: list[str] = []
