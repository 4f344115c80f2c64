"""DCN-v2 ranking: a click (and rating) model over sharded embedding tables (model.py), configured
by the ``model.dcn`` section (config.py); its setup mines hard negatives with another trained
run's retriever, which it receives through the setup context's loader."""

from trec.models.dcn.config import DCNConfig
from trec.models.spec import ModelSpec


def build_task(model, section: DCNConfig, dataset):
    from trec.models.dcn.model import RankingTask  # torchrec is imported only when a task is built

    return RankingTask(model, section, dataset)


def evaluate(task, dataset, request, ctx):
    from trec.models.dcn.model import evaluate_dcn

    return evaluate_dcn(task, dataset, request, ctx)


def setup(task, context):
    from trec.models.dcn.model import setup_dcn

    setup_dcn(task, context)


SPEC = ModelSpec(name="dcn", config=DCNConfig, build_task=build_task, evaluate=evaluate, default_metric="auc",
                 setup=setup)
