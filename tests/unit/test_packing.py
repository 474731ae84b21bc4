"""Per-node packing of units onto one GPU type's nodes."""

from policies.packing import TypePacker


def test_best_fit_follows_the_worked_example():
    p = TypePacker([8, 8, 4])
    assert p.place(3, 3) == 3
    assert p.hist == {100: 1, 200: 1, 800: 1}


def test_free_gpus_on_separate_nodes_do_not_make_a_big_worker():
    p = TypePacker([4, 4])
    assert p.place(1, 2) == 2
    assert p.max_units(4) == 1
    assert p.place(4, 2) == 1
    assert p.free_gpus == 2


def test_fractional_units_share_gpus_without_overcommitting():
    p = TypePacker([1, 1])
    assert p.place(0.3, 10) == 6  # three 0.3-GPU replicas per 1-GPU node
    assert abs(p.free_gpus - 0.2) < 1e-9
