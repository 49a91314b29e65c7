"""llamajob operator: LlamaTrainingJob API, planner, renderer, reconciler and shells.

Never imports torch (the operator image has none); the trainer's pure modules
(`llamajob_trainer.config`, `.presets`, `.protocol`) are the only trainer code used here.
"""

__version__ = "0.1.0"
