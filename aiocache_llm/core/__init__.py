"""Shared building blocks of every layer: values, keys, codec, errors, validation, configs."""
