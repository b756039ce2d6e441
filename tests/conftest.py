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
