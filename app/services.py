"""What every part of the page works with: the models offered, the kept generations, the image files,
where the model work runs, and the server's limits. Event handlers take it as their first argument."""

from __future__ import annotations

from dataclasses import dataclass, field

from .image_files import ImageFiles
from .policy import ServerLimits, StopRequests
from .registry import ModelRegistry
from .store import GenerationStore
from .tasks import ModelTasks
from .zerogpu import GpuTasks


@dataclass
class Services:
    registry: ModelRegistry
    store: GenerationStore
    files: ImageFiles
    tasks: ModelTasks
    limits: ServerLimits
    gpu: GpuTasks
    memory_label: str  # what the Memory tab measures on this server ("peak RSS above the weights")
    stops: StopRequests = field(default_factory=StopRequests)  # the Stop buttons' presses
