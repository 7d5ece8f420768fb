"""Layer 3: ``InferenceGateway.resolve`` and the ``@cached_completion`` decorator."""
