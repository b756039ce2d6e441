"""The benchmarks: ``ppwrap bench`` (:mod:`.pipeline`, with :mod:`.rank` on every
rank) against stock mlx-lm pipelining, and ``ppwrap bench-serve`` (:mod:`.serve`)
against mlx-lm's own server."""
