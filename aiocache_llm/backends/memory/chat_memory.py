"""PLACEHOLDER: replaced by the helper that builds MemoryChatMemory."""


class MemoryChatMemory:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError
