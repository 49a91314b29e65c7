"""llamajob trainer: Llama pre-training with torch-native or Neuron parallelism.

Submodules that import torch are imported lazily; `config`, `presets` and `protocol` are pure
and safe for the operator to import.
"""

__version__ = "0.1.0"
