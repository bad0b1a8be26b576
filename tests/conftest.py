import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("HISTO_WSSS_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"shared H&E data not found at {d}; set HISTO_WSSS_DATA to the folder holding wsss4luad-subset/ etc.")
    return d


@pytest.fixture(scope="session")
def cmu_svs(data_dir) -> Path:
    return data_dir / "wsi-cmu-small-region" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def cmu_pyramid(data_dir) -> Path:
    return data_dir / "wsi-cmu-small-region" / "CMU-1-Small-Region.pyramid.tif"


@pytest.fixture(scope="session")
def wsss4luad_dir(data_dir) -> Path:
    return data_dir / "wsss4luad-subset"


@pytest.fixture(scope="session")
def glas_dir(data_dir) -> Path:
    return data_dir / "glas-testA"
