"""mlx-lm's own PipelineMixin split, wrapped: 2 and 3 ranks over the ring backend.

One launch per rank count checks every PipelineMixin family; see
``ranks/pipeline_families.py`` for what each rank does.
"""

import pytest

from ppwrap._support import NEEDS_METAL

from families import CONFIGS, pipeline_mixin_families
from launcher import family_results, launch

FAMILIES = [f for f in pipeline_mixin_families() if f not in NEEDS_METAL]
STEPS = 16


def test_every_pipeline_mixin_family_is_checked_but_the_metal_only_one():
    assert sorted(set(pipeline_mixin_families()) - set(FAMILIES)) == ["muse_spark"]
    assert all((CONFIGS / f"{f}.json").exists() for f in FAMILIES)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request):
    return launch(
        "pipeline_families.py", request.param, str(STEPS), "mlx-lm", *FAMILIES, timeout=600
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_final_rank_matches_unsharded_and_other_ranks_skip_the_head(ranks, family):
    # Non-final ranks had their head disarmed (ranks/pipeline_families.py).
    family_results(ranks, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_with_token_from_final_rank_matches_unsharded_each_step(ranks, family):
    final, others = family_results(ranks, family)
    assert final["steps_ok"], final
    results = [final, *others]
    for r in results:
        assert r["tokens_ok"], r
        assert len(r["tokens"]) == STEPS
