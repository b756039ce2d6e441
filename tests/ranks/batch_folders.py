"""On every rank: ppwrap.load each checkpoint folder and decode several prompts as one batch.

Usage (on every rank): batch_folders.py OUT_DIR FOLDER [FOLDER ...]

Per folder the rank records, for prompts of different lengths (see PROMPTS):
the greedy tokens of each (per-sequence token limits, so sequences leave the
batch at different steps); the tokens of the same batch where the final rank
stops sequence 1 after 3 tokens; the seeded sampled tokens of each sequence in
the batch and of the same sequence alone; and the collectives per decode step.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from common import COUNTED, calls, count_collectives, write_result

import mlx.core as mx

import ppwrap

PROMPTS = [[5, 9, 14, 2, 7, 30, 11], [3, 8], [21, 4, 4, 17, 6, 1, 9, 12, 25, 13, 2], [40]]
LIMITS = [12, 7, 10, 12]


def decode(head: ppwrap.PipelineHead, prompts: list[list[int]], **kwargs: Any) -> list[list[int]]:
    tokens: list[list[int]] = [[] for _ in prompts]
    for rows in ppwrap.batch_generate_step(prompts, head, **kwargs):
        for i, token, _ in rows:
            tokens[i].append(token)
    return tokens


def main() -> None:
    out_dir, folders = sys.argv[1], sys.argv[2:]
    count_collectives()
    group = mx.distributed.init()
    results: dict[str, Any] = {}
    for folder in folders:
        head, _ = ppwrap.load(folder, group=group)
        greedy = decode(head, PROMPTS, max_tokens=LIMITS)
        waking = decode(head, PROMPTS, max_tokens=LIMITS, wait="wake")
        stopped: list[list[int]] = [[] for _ in PROMPTS]
        for rows in ppwrap.batch_generate_step(
            PROMPTS,
            head,
            max_tokens=10,
            should_stop=lambda i, got=stopped: i == 1 and len(got[1]) >= 3,
        ):
            for i, token, _ in rows:
                stopped[i].append(token)
        seeds = [ppwrap.row_sampler(1.0, seed=100 + i) for i in range(len(PROMPTS))]
        sampled = decode(head, PROMPTS, max_tokens=8, samplers=seeds)
        alone = decode(
            head, PROMPTS[2:3], max_tokens=8, samplers=[ppwrap.row_sampler(1.0, seed=102)]
        )
        # One micro-batch: a step of the batch is one position round the ring.
        calls.clear()
        decode(head, PROMPTS[:2], max_tokens=4, micro_batches=1)
        at_4 = Counter(calls)
        calls.clear()
        decode(head, PROMPTS[:2], max_tokens=12, micro_batches=1)
        per_step = {k: (calls[k] - at_4[k]) / 8 for k in COUNTED}
        results[Path(folder).name] = {
            "rank": head.rank,
            "greedy": greedy,
            "waking": waking,
            "stopped": stopped,
            "sampled": sampled,
            "alone": alone[0],
            "per_step": per_step,
        }
        write_result(out_dir, group.rank(), results)


if __name__ == "__main__":
    main()
