"""Models from outside: GGUF conversion and the demo's model, fetched and cached
(:mod:`.gguf`)."""
