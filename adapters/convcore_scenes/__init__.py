"""Chat modes as scenes: chat_app, chat_data, chat_knowledge and chat_flow,
their registries over a :class:`~convcore.RecordStore`, and their
``/api/v2/serve/...`` HTTP routers.

::

    from convcore_scenes import SceneKit
    kit = SceneKit(records)
    engine = Engine(store, models, scenes=kit.scenes())
    app = create_app(engine, api_keys=[...], extra_routers=kit.routers())

Needs the ``scenes`` extra (``pip install "convcore[scenes]"``) and, for the
routers, the ``server`` extra.
"""

from convcore.errors import MissingDependencyError

try:
    import sqlalchemy  # noqa: F401  (chat_data's schema inspection and runner)
except ImportError as _exc:  # pragma: no cover - the scenes extra installs it
    raise MissingDependencyError("convcore_scenes", "scenes") from _exc

from .apps import App, AppIn, AppRegistry, AppScene
from .base import DuplicateError, NotFoundError
from .data_scene import DataScene
from .datasources import Datasource, DatasourceIn, DatasourceRegistry
from .evaluation import DatasetItem, EvaluationRun, evaluate_retriever
from .flows import Flow, FlowIn, FlowRegistry, FlowScene, FlowStep
from .knowledge import Document, DocumentIn, KnowledgeBase, Space, SpaceIn
from .knowledge_scene import KnowledgeScene
from .wiring import SceneKit, build_routers, build_scenes

__all__ = [
    "App",
    "AppIn",
    "AppRegistry",
    "AppScene",
    "DataScene",
    "DatasetItem",
    "Datasource",
    "DatasourceIn",
    "DatasourceRegistry",
    "Document",
    "DocumentIn",
    "DuplicateError",
    "EvaluationRun",
    "Flow",
    "FlowIn",
    "FlowRegistry",
    "FlowScene",
    "FlowStep",
    "KnowledgeBase",
    "KnowledgeScene",
    "NotFoundError",
    "SceneKit",
    "Space",
    "SpaceIn",
    "build_routers",
    "build_scenes",
    "evaluate_retriever",
]
