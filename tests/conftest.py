import sys
from pathlib import Path

import pytest

# The tests import their shared helpers (families, launcher) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder, fetched and converted once per machine."""
    from ppwrap.models.gguf import default_model

    return default_model(progress=lambda message: None)


# Test tiers. `python -m pytest -m "not slow"` is the quick loop for someone changing one
# file; the README's command, and .ci/run, run everything.
#   multirank: starts ranks or servers (processes and ports, seconds each)
#   network:   needs the real SmolLM2 (fetched once per machine)
#   slow:      either of those, or a tool over the whole tree (ruff, mypy, a wheel, the site)
MULTIRANK_MODULES = {
    "test_batch",
    "test_bench_serve",
    "test_faults",
    "test_generate",
    "test_launch",
    "test_pipeline_mixin",
    "test_readme",
    "test_serve",
}
MULTIRANK_TESTS = {
    "test_bench_writes_report",
    "test_bench_link_delay_reports_time_per_token_and_implied_hops",
    "test_both_stream_choices_give_the_same_logits",
    "test_demo_answers_with_the_real_model_on_two_ranks_and_rank_1_skips_the_head",
    "test_demo_with_random_weights_says_its_text_is_meaningless",
    "test_example_runs_as_written",
    "test_custom_family_example_prints_its_family_and_logit_shape",
    "test_generate_on_two_local_ranks_prints_text_speeds_and_every_ranks_memory",
}
TOOL_MODULES = {"test_lint", "test_packaging"}
TOOL_TESTS = {"test_docs_build_in_strict_mode"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        name = getattr(item, "originalname", item.name)
        fixtures = set(getattr(item, "fixturenames", ()))
        multirank = module in MULTIRANK_MODULES or name in MULTIRANK_TESTS or "ranks" in fixtures
        network = bool({"smollm2", "smollm"} & fixtures)
        if multirank:
            item.add_marker(pytest.mark.multirank)
        if network:
            item.add_marker(pytest.mark.network)
        if multirank or network or module in TOOL_MODULES or name in TOOL_TESTS:
            item.add_marker(pytest.mark.slow)
