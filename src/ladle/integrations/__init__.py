"""Optional integrations with training frameworks and tools, imported lazily (one module each)."""
