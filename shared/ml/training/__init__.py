"""Stage 2: group adapters (QLoRA), baselines, boosting of hard groups, the weighted ensemble.

    params.py    TrainingParams, PipelineParams
    trainer.py   train_adapter(base, tasks, config, progress, name, init_state) -> TrainedAdapter (fit_lora)
    many.py      train_many(base, specs, config, data): K adapters, fused (multi.py) or one by one
    adapters.py  save_adapter / load_adapter_state (PEFT folders + chorus_adapter.json, sha256-checked)
    boosting.py  residuals and weak learners fitted to them (example ids carried through every batch)
    ensemble.py  EnsembleManifest (ensemble.json), ensemble_choice_logits (the reference scorer)
    costs.py     tokens, analytic FLOPs, peak memory, wall time
    stage.py     run_training, pipeline_stages, run_pipeline (job stages)

Modules are imported on use (no torch import here), so the API can load the params classes cheaply.
"""
