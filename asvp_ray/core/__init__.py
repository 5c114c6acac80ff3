"""The bottom layer: errors, input checks, registries and credential redaction; imports nothing else of the package."""
