"""zuoyou: Janus-Pro-style unified multimodal models (understand and draw images) on ordinary computers.

    import zuoyou
    pipe = zuoyou.load()            # the bundled ShapesWorld model, or a folder / hub id
    images = pipe.generate("a photo of a red circle left of a blue square", n=4)
    print(pipe.ask(images[0], "How many objects are there?"))
"""

from .api import GenerationDefaults, Pipeline, load
from .errors import CheckpointError, ConfigError, InputError, ZuoyouError

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "GenerationDefaults", "ZuoyouError", "CheckpointError", "ConfigError", "InputError"]
