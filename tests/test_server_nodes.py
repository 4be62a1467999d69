"""The ServerApp counts SuperNodes only once the federation has come up."""
from server.app import connected_nodes


class RegisteringGrid:
    """A grid whose nodes register one per call to get_node_ids, up to ``total``."""

    def __init__(self, total: int) -> None:
        self.total, self.seen = total, 0

    def get_node_ids(self):
        self.seen = min(self.seen + 1, self.total)
        return list(range(self.seen))


def test_waits_for_nodes_still_registering():
    grid = RegisteringGrid(total=10)
    assert connected_nodes(grid, want=10, wait_s=30) == 10


def test_gives_up_after_the_wait_and_reports_what_is_there():
    grid = RegisteringGrid(total=3)
    assert connected_nodes(grid, want=10, wait_s=0.6) == 3


def test_more_nodes_than_wanted_are_counted_at_once():
    grid = RegisteringGrid(total=1)
    assert connected_nodes(grid, want=0, wait_s=30) == 1
