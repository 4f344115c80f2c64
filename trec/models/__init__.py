"""Models: the written contract (:mod:`trec.models.spec`), one folder per model, shared blocks (modules.py).

    from trec.models import load_config, model_spec
    cfg = load_config("configs/movielens_mf.yaml")      # every registered model's section is known
    spec = model_spec(cfg.model.name)                    # imports that model's package only now

See README "Adding a model" for the checklist.
"""

from trec.models.spec import (EvaluationRequest, ModelSpec, Retriever, RetrieverLoader, RetrieverRun,
                              SetupContext, Task, config_schema, default_config, evaluate_retriever, load_config,
                              model_names, model_spec, register_model, retriever_of)

__all__ = [
    "EvaluationRequest", "ModelSpec", "Retriever", "RetrieverLoader", "RetrieverRun", "SetupContext", "Task",
    "config_schema", "default_config", "evaluate_retriever", "load_config", "model_names", "model_spec",
    "register_model", "retriever_of",
]
