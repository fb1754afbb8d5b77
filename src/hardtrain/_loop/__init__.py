"""The training loop's parts: the feature protocol, the ballot, the step and the state.

Nothing here imports a feature (``hardtrain._features``) or the trainer; the features
and the trainer import from here. See docs/architecture.md.
"""
