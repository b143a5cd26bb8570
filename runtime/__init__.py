"""hearth.runtime — model loading, checkpoints, the engine, scheduling, KV cache, sampling.

Importing this package pulls in neither torch nor transformers: the llama.cpp path and the offline
edge app run without them. The transformers backend imports them when it is constructed.
"""

from .engine import Engine, EngineStats
from .errors import (CapacityError, ContextLengthExceeded, EngineDeadError, HearthError, InvalidRequestError,
                     ModelLoadError, ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError)
from .prompt import PromptRequest, encode_chat, encode_prompt, to_generation_request
from .types import (CompletionResult, GenerationOutput, GenerationRequest, GuidedDecoding, SamplingParams,
                    TokenLogprob, Usage)

__all__ = [
    "Engine", "EngineStats", "GenerationRequest", "GenerationOutput", "CompletionResult", "SamplingParams",
    "GuidedDecoding", "TokenLogprob", "Usage", "HearthError", "InvalidRequestError", "ContextLengthExceeded",
    "ModelNotFoundError", "ModelLoadError", "UnsafeCheckpointError", "UnsupportedModelError",
    "EngineDeadError", "CapacityError", "PromptRequest", "encode_chat", "encode_prompt", "to_generation_request",
]
