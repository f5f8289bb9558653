"""convcore: a multi-turn conversation engine with pluggable storage.

Import the engine, a store and a model registry from here; adapters live in
their own packages, found through entry points (:mod:`convcore.plugins`),
and are never imported by this one.
"""

from .audit import AuditReport, audit_messages
from .bootstrap import DEFAULT_MODEL, default_registry, open_engine, open_store
from .compaction import Compactor
from .content import ContentPart
from .engine import Engine, TurnStream
from .errors import (
    BackendError,
    BackendRateLimitedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConflictError,
    ContextOverflowError,
    ConvcoreError,
    ConversationNotFoundError,
    ForkPointError,
    HistoryConflictError,
    InvalidRequestError,
    MissingDependencyError,
    PermissionDeniedError,
    StorageError,
    StorageUnavailableError,
    TokenizerError,
    UnknownModelError,
    UnsupportedChatModeError,
)
from .generation import Generation, GenerationChunk, GenerationRequest, PromptMessage
from .local import LocalBackend, echo_reply
from .memory import MemoryStore
from .models import (
    AppendResult,
    Conversation,
    FunctionCall,
    Message,
    MessageDraft,
    Role,
    ToolCall,
    TurnContext,
    TurnRecord,
    TurnWrite,
)
from .owners import OPERATOR, Caller
from .protocols import ConversationStore, ModelBackend, Storage, Tokenizer
from .records import MemoryRecordStore, RecordStore
from .registry import ModelRegistry, ModelSpec
from .scenes import NormalScene, Scene, ScenePlan, SceneRegistry, SceneRequest
from .schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    InputMessage,
    Usage,
    parse_chat_request,
)
from .sync import SyncEngine
from .tokens import count_message, encoding_for_model, get_tokenizer, register_encoding_file
from .trim import TrimReport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "OPERATOR",
    "AppendResult",
    "AuditReport",
    "BackendError",
    "BackendRateLimitedError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "Caller",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatRequest",
    "Compactor",
    "ConflictError",
    "ContentPart",
    "ContextOverflowError",
    "ConvcoreError",
    "Conversation",
    "ConversationNotFoundError",
    "ConversationStore",
    "Engine",
    "ForkPointError",
    "FunctionCall",
    "Generation",
    "GenerationChunk",
    "GenerationRequest",
    "HistoryConflictError",
    "InputMessage",
    "InvalidRequestError",
    "LocalBackend",
    "MemoryRecordStore",
    "MemoryStore",
    "Message",
    "MessageDraft",
    "MissingDependencyError",
    "ModelBackend",
    "ModelRegistry",
    "ModelSpec",
    "NormalScene",
    "PermissionDeniedError",
    "PromptMessage",
    "RecordStore",
    "Role",
    "Scene",
    "ScenePlan",
    "SceneRegistry",
    "SceneRequest",
    "Storage",
    "StorageError",
    "StorageUnavailableError",
    "SyncEngine",
    "Tokenizer",
    "TokenizerError",
    "ToolCall",
    "TrimReport",
    "TurnContext",
    "TurnRecord",
    "TurnStream",
    "TurnWrite",
    "UnknownModelError",
    "UnsupportedChatModeError",
    "Usage",
    "__version__",
    "audit_messages",
    "count_message",
    "default_registry",
    "echo_reply",
    "encoding_for_model",
    "get_tokenizer",
    "open_engine",
    "open_store",
    "parse_chat_request",
    "register_encoding_file",
]
