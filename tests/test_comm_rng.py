"""Client placement and RNG streams: the two things rank-count invariance rests on."""

from osfed_hpc.comm import assign_clients, owner_map
from osfed_hpc.rng import select_clients, torch_stream


def test_assignment_balances_skewed_sizes_better_than_round_robin():
    sizes = [1000, 900, 10, 10, 10, 10, 800, 5]
    placement = assign_clients(sizes, [1, 2, 3])
    assert sorted(c for cs in placement.values() for c in cs) == list(range(len(sizes)))
    loads = [sum(sizes[c] for c in cs) for cs in placement.values()]
    round_robin = [sum(sizes[c] for c in range(r, len(sizes), 3)) for r in range(3)]
    assert max(loads) < max(round_robin)
    assert max(loads) == 1000


def test_assignment_is_deterministic_and_owner_map_inverts_it():
    placement = assign_clients([5, 5, 5, 5], [1, 2])
    assert placement == assign_clients([5, 5, 5, 5], [1, 2])
    owners = owner_map(placement)
    assert all(c in placement[r] for c, r in owners.items())


def test_client_selection_depends_on_seed_and_round_only():
    a = select_clients(0, 3, 60, 0.25)
    assert a == select_clients(0, 3, 60, 0.25) and len(a) == 15 and a == sorted(a)
    assert a != select_clients(0, 4, 60, 0.25)
    assert select_clients(0, 1, 10, 1.0) == list(range(10))


def test_torch_streams_are_keyed():
    x = torch_stream(0, "client", 1, 2).initial_seed()
    assert x == torch_stream(0, "client", 1, 2).initial_seed()
    assert x != torch_stream(0, "client", 1, 3).initial_seed()
    assert x != torch_stream(1, "client", 1, 2).initial_seed()
