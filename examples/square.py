"""The Quick start demo: a local master and 2 workers, a lambda mapped over them.

    python examples/square.py
"""
import cw.mp
from cw.client import ClusterExecutor


def main() -> None:
    with cw.mp.allocate(2, port=0) as cluster:          # master + 2 workers, stopped at the end
        with ClusterExecutor(cluster.host, cluster.port) as ex:
            print(list(ex.map(lambda x: x * x, range(10))))


if __name__ == "__main__":
    main()
