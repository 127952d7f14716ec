import pytest
import userproj

pytest_plugins = ["celery_unique.testing"]


@pytest.fixture
def unique_app():
    return userproj.app
