"""``ppwrap serve``: an OpenAI-compatible server over a pipeline of ranks.

:mod:`.app` is the HTTP side (FastAPI), :mod:`.engine` the loop every rank runs,
:mod:`.prefix` the prompt-prefix cache. Needs the ``serve`` extra.
"""
