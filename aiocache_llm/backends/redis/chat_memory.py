"""PLACEHOLDER: replaced by the helper that builds RedisChatMemory."""


class RedisChatMemory:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError
