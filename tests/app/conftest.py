import pytest

from benchmarks.bench_app import serve
from tests.app.test_served_app import START_TIMEOUT


@pytest.fixture(scope="session")
def shared_served_app():
    """One `streamlit run` (here, in a conftest, so that its modules share it) for the tests of what a page does
    once its model is loaded: Back and Forward, the token strip, a hostile link. Each opens its own page, so its
    own Streamlit session; none depends on the model loading cold, which
    test_served_app_draws_the_charts_after_analyse checks on a server of its own (served_app)."""
    with serve(start_timeout=START_TIMEOUT) as (url, _pid):
        yield url
