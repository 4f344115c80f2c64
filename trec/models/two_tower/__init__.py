"""Two-tower retrieval: a user tower and an item tower over sharded embedding tables (model.py),
configured by the ``model.two_tower`` section (config.py)."""

from trec.models.spec import ModelSpec, evaluate_retriever
from trec.models.two_tower.config import TwoTowerConfig


def build_task(model, section: TwoTowerConfig, dataset):
    from trec.models.two_tower.model import RetrievalTask  # torchrec is imported only when a task is built

    return RetrievalTask(model, section, dataset)


SPEC = ModelSpec(name="two_tower", config=TwoTowerConfig, build_task=build_task, evaluate=evaluate_retriever,
                 default_metric="ndcg@10")
