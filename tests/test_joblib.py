"""The joblib backend on a real master with 2 workers: Parallel and scikit-learn's GridSearchCV."""
from __future__ import annotations

import os

import pytest

joblib = pytest.importorskip("joblib", reason="the joblib backend needs joblib: "
                                              "pip install 'cw[joblib]'")

import cw.joblib  # noqa: E402
from cw.joblib import ClusterBackend  # noqa: E402


@pytest.fixture(autouse=True)
def registered():
    cw.joblib.register()


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def test_parallel_runs_on_the_workers(cluster):
    expected_pids = {w["pid"] for w in cluster.wait_workers(2)["workers"]}
    with joblib.parallel_config(backend="cw", host=cluster.host, port=cluster.port):
        assert joblib.effective_n_jobs() == 2          # one per registered worker
        squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(50))
        pids = joblib.Parallel(batch_size=1)(joblib.delayed(os.getpid)() for _ in range(8))
    assert squares == [i * i for i in range(50)]
    assert set(pids) <= expected_pids and os.getpid() not in pids
    assert cluster.status()["routed"] >= 2


def test_a_failing_call_raises_its_error_here(cluster):
    with joblib.parallel_config(backend="cw", host=cluster.host, port=cluster.port):
        with pytest.raises(ValueError, match="three is not allowed"):
            joblib.Parallel(n_jobs=2, batch_size=1)(
                joblib.delayed(fail_on_three)(i) for i in range(6))


def test_effective_n_jobs_counts_workers():
    backend = ClusterBackend()
    backend.workers = lambda: 5
    assert [backend.effective_n_jobs(n) for n in (None, -1, -2, 3, 9)] == [5, 5, 4, 3, 9]
    backend.workers = lambda: 0
    assert backend.effective_n_jobs(-1) == 1
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)


@pytest.mark.timeout(120)
def test_grid_search_matches_a_local_run(cluster):
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install 'cw[joblib]'")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]}
    local = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    before = cluster.status()["routed"]
    with joblib.parallel_config(backend="cw", host=cluster.host, port=cluster.port):
        remote = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    assert remote.best_params_ == local.best_params_
    assert remote.best_score_ == local.best_score_
    assert list(remote.cv_results_["mean_test_score"]) == \
        list(local.cv_results_["mean_test_score"])
    assert cluster.status()["routed"] > before  # the fits went through the cluster
