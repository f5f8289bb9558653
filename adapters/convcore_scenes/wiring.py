"""Everything wired from one RecordStore.

::

    store = open_store("sqlite:///convcore.db")   # any store URL
    kit = SceneKit(store.records)                 # records on the store's connections
    engine = Engine(store, models, scenes=kit.scenes(), owned=True)
    app = create_app(engine, api_keys=[...], extra_routers=kit.routers())

``build_scenes(records)`` and ``build_routers(records)`` do the same in one
call each; built separately they still agree, because every registry reads
the store (the knowledge index checks the space's revision on each search).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convcore.records import RecordStore
from convcore.scenes import NormalScene, Scene, SceneRegistry

from .apps import AppRegistry, AppScene
from .data_scene import DataScene
from .datasources import DatasourceRegistry
from .flows import FlowRegistry, FlowScene
from .knowledge import KnowledgeBase
from .knowledge_scene import KnowledgeScene
from .secret_box import SecretBox

if TYPE_CHECKING:
    from convcore_server.app import RouterSource

__all__ = ["SceneKit", "build_routers", "build_scenes"]


@dataclass
class SceneKit:
    """The registries over ``records``, and the scenes and routers on them.

    ``sqlite_roots`` confines SQLite datasources to those directories (an
    empty list refuses them) and ``sqlite_denied`` refuses those files;
    ``store_url`` (the service's own store) is never a datasource;
    ``secrets`` seals datasource passwords (none: passwords are refused);
    see :class:`DatasourceRegistry`.
    A flow step may name any scene of :attr:`registry` (this kit's scenes and
    chat_normal; :meth:`use_registry` points flows at an engine's registry,
    so scenes registered there work in flows too).
    """

    records: RecordStore
    sqlite_roots: list[str | Path] | None = None
    sqlite_denied: list[str | Path] | None = None
    secrets: SecretBox | None = None
    store_url: str | None = None
    apps: AppRegistry = field(init=False)
    datasources: DatasourceRegistry = field(init=False)
    knowledge: KnowledgeBase = field(init=False)
    flows: FlowRegistry = field(init=False)
    registry: SceneRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.apps = AppRegistry(self.records)
        self.datasources = DatasourceRegistry(
            self.records,
            sqlite_roots=self.sqlite_roots,
            sqlite_denied=self.sqlite_denied,
            secrets=self.secrets,
            store_url=self.store_url,
        )
        self.knowledge = KnowledgeBase(self.records)
        self.flows = FlowRegistry(self.records, self._scene_map)
        self._scenes: list[Scene] = [
            AppScene(self.apps),
            DataScene(self.datasources),
            KnowledgeScene(self.knowledge),
            FlowScene(self.flows, self._scene_map),
        ]
        self.registry = SceneRegistry.of([NormalScene(), *self._scenes])

    def _scene_map(self) -> Mapping[str, Scene]:
        return self.registry.scenes

    def use_registry(self, registry: SceneRegistry) -> None:
        """Let flow steps name the scenes of ``registry`` (an engine's)."""
        self.registry = registry

    async def ready(self) -> None:
        """What a service does once at start, before it serves: seal stored
        passwords under the first secret key, and claim the SQLite files of
        datasources stored before a file could belong to one datasource only."""
        await self.datasources.reseal()
        await self.datasources.claim_files()

    def scenes(self) -> list[Scene]:
        """chat_app, chat_data, chat_knowledge and chat_flow."""
        return list(self._scenes)

    def routers(self) -> list[RouterSource]:
        """The ``/api/v2/serve/...`` routers, each built on the server's
        context (for the caller's identity); needs the ``server`` extra."""
        from .routes_apps import build_apps_router
        from .routes_datasources import build_datasources_router
        from .routes_evaluation import build_evaluation_router
        from .routes_flows import build_flow_run_router, build_flows_router
        from .routes_knowledge import build_knowledge_router

        return [
            functools.partial(build_apps_router, self.apps),
            functools.partial(build_datasources_router, self.datasources),
            functools.partial(build_knowledge_router, self.knowledge),
            functools.partial(build_flows_router, self.flows),
            functools.partial(build_flow_run_router, self.flows),
            functools.partial(build_evaluation_router, self.knowledge),
        ]


def _kit(source: RecordStore | SceneKit) -> SceneKit:
    return source if isinstance(source, SceneKit) else SceneKit(source)


def build_scenes(records: RecordStore | SceneKit) -> list[Scene]:
    """The four scenes over ``records`` (or over a kit's registries)."""
    return _kit(records).scenes()


def build_routers(records: RecordStore | SceneKit) -> list[RouterSource]:
    """The serve routers over ``records`` (or over a kit's registries)."""
    return _kit(records).routers()
