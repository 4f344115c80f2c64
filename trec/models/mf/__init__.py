"""Matrix factorization (BPR-MF): user and item ID embeddings whose dot product is the score
(model.py), configured by the ``model.mf`` section (config.py). A retriever: evaluated over the
whole catalog and exported into a FAISS index like the two-tower."""

from trec.models.mf.config import MFConfig
from trec.models.spec import ModelSpec, evaluate_retriever


def build_task(model, section: MFConfig, dataset):
    from trec.models.mf.model import MFTask  # torchrec is imported only when a task is built

    return MFTask(model, section, dataset)


SPEC = ModelSpec(name="mf", config=MFConfig, build_task=build_task, evaluate=evaluate_retriever,
                 default_metric="ndcg@10")
