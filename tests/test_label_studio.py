"""The Label Studio client's API calls against the local stand-in: paging, retries, clear errors."""

import pytest

from ale_backend.label_studio import LabelStudioClient, LabelStudioError
from testkit.label_studio_stand_in import add_project


def client_for(server, **kwargs):
    return LabelStudioClient(server.url, server.legacy_token, backoff=0.01, **kwargs)


def test_tasks_are_read_page_by_page(label_studio):
    add_project(label_studio, 3, n_tasks=7, seed=0)
    tasks = list(client_for(label_studio).tasks(3, page_size=3))
    assert [t["id"] for t in tasks] == [3000 + i for i in range(7)]
    pages = [path for path, _ in label_studio.requests if path.startswith("/api/tasks/")]
    assert len(pages) == 3


def test_server_errors_are_retried_with_backoff(label_studio):
    add_project(label_studio, 3, n_tasks=1, seed=0)
    label_studio.api_failures = 2
    assert client_for(label_studio, retries=3).project(3)["id"] == 3


def test_persistent_failures_end_with_a_clear_error(label_studio):
    add_project(label_studio, 3, n_tasks=1, seed=0)
    label_studio.api_failures = 10
    with pytest.raises(LabelStudioError, match=r"kept failing on GET /api/projects/3/ after 3 attempts: HTTP 503"):
        client_for(label_studio, retries=2).project(3)


def test_a_post_that_may_have_been_applied_is_not_repeated(label_studio):
    add_project(label_studio, 3, n_tasks=2, seed=0)
    label_studio.import_failures_after_commit = 1
    items = [{"task": 3000, "result": [], "score": 0.5, "model_version": "v1"}]
    with pytest.raises(LabelStudioError, match="not retried, since Label Studio may have applied it"):
        client_for(label_studio, retries=3).import_predictions(3, items)
    assert len(label_studio.predictions[3]) == 1  # one copy: no duplicate from a retry
    assert client_for(label_studio).import_predictions(3, items) == 1  # and the next call works


def test_a_post_that_never_connected_is_retried(label_studio):
    client = LabelStudioClient("http://127.0.0.1:9", "key", retries=2, backoff=0.01, timeout=1)
    with pytest.raises(LabelStudioError, match="kept failing on POST .* after 3 attempts: ConnectionError"):
        client.import_predictions(3, [])


def test_refusals_are_not_retried_and_say_why(label_studio):
    with pytest.raises(LabelStudioError, match=r"HTTP 404: Not found"):
        client_for(label_studio).project(99)
    bad_key = LabelStudioClient(label_studio.url, "wrong", backoff=0.01)
    with pytest.raises(LabelStudioError, match="HTTP 401"):
        bad_key.project(99)


def test_unreachable_label_studio_is_reported():
    client = LabelStudioClient("http://127.0.0.1:9", "key", retries=1, backoff=0.01, timeout=1)
    with pytest.raises(LabelStudioError, match="kept failing .* ConnectionError"):
        client.project(1)
